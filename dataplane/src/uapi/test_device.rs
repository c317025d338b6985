//! Test-only [`DeviceControl`] that keeps the configuration in memory. It stands in for the
//! engine so the socket protocol can be tested alone; it follows the update semantics the
//! engine implements (replace_peers, remove, update_only, replace_allowed_ips, own key
//! ignored, private key clamped) closely enough for `wg` to read back what it wrote.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::config::{
    AllowedIpChange, DeviceControl, DeviceSnapshot, DeviceUpdate, PeerSnapshot, SetError,
};

/// A listen port this device refuses, to test error replies.
pub const BUSY_PORT: u16 = 1;

#[derive(Default)]
pub struct MemoryDevice {
    pub state: Mutex<DeviceSnapshot>,
    /// Every update received, in order.
    pub updates: Mutex<Vec<DeviceUpdate>>,
}

impl MemoryDevice {
    pub fn snapshot(&self) -> DeviceSnapshot {
        self.state.lock().unwrap().clone()
    }

    pub fn set_handshake(&self, index: usize, at: SystemTime, rx: u64, tx: u64) {
        let mut state = self.state.lock().unwrap();
        let peer = &mut state.peers[index];
        peer.last_handshake = Some(at);
        peer.rx_bytes = rx;
        peer.tx_bytes = tx;
    }
}

impl DeviceControl for MemoryDevice {
    fn get(&self) -> DeviceSnapshot {
        self.snapshot()
    }

    fn set(&self, update: DeviceUpdate) -> Result<(), SetError> {
        if update.listen_port == Some(BUSY_PORT) {
            return Err(SetError::AddressInUse(format!("port {BUSY_PORT}")));
        }
        self.updates.lock().unwrap().push(update.clone());
        let mut s = self.state.lock().unwrap();
        if let Some(k) = update.private_key {
            s.private_key = k.map(|k| k.clamped());
        }
        if let Some(port) = update.listen_port {
            s.listen_port = port;
        }
        if let Some(mark) = update.fwmark {
            s.fwmark = mark;
        }
        if update.replace_peers {
            s.peers.clear();
        }
        let own = s.private_key.map(|k| k.public_key());
        for p in update.peers {
            if Some(p.public_key) == own {
                continue;
            }
            let pos = s.peers.iter().position(|x| x.public_key == p.public_key);
            if p.remove {
                if let Some(i) = pos {
                    s.peers.remove(i);
                }
                continue;
            }
            let i = match pos {
                Some(i) => i,
                None if p.update_only => continue,
                None => {
                    s.peers.push(PeerSnapshot::new(p.public_key));
                    s.peers.len() - 1
                }
            };
            let peer = &mut s.peers[i];
            if let Some(psk) = p.preshared_key {
                peer.preshared_key = psk;
            }
            if let Some(e) = p.endpoint {
                peer.endpoint = Some(e);
            }
            if let Some(k) = p.persistent_keepalive {
                peer.persistent_keepalive = k;
            }
            if p.replace_allowed_ips {
                peer.allowed_ips.clear();
            }
            // A set alongside the list keeps 30,000-prefix updates fast in debug builds.
            let mut present: HashSet<IpNet> = peer.allowed_ips.iter().copied().collect();
            for change in p.allowed_ips {
                match change {
                    AllowedIpChange::Add(n) => {
                        if present.insert(n) {
                            peer.allowed_ips.push(n);
                        }
                    }
                    AllowedIpChange::Remove(n) => {
                        if present.remove(&n) {
                            peer.allowed_ips.retain(|x| *x != n);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
