//! A numbered UDP stream from one pod to another, counted at the receiver: which numbers
//! arrived, which are missing, and how many arrived more than once. It shows what a tunnel
//! delivers to the pods, whatever the underlay did to the datagrams carrying it.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::Context;

use crate::topology::Pod;

/// How long the receiver waits for more once the stream has gone quiet: anything held back
/// on the way has been released by then.
const QUIET: Duration = Duration::from_secs(2);

/// What the receiving pod saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCount {
    pub sent: u32,
    pub delivered: u32,
    pub missing: u32,
    pub duplicates: u32,
}

/// Sends `count` UDP datagrams numbered 0.. from `from` to `to` over IPv4, paced at about
/// 5,000 per second, and counts at `to` how often each number arrived.
pub fn stream(from: &Pod, to: &Pod, count: u32) -> anyhow::Result<StreamCount> {
    let receiver = to
        .netns()
        .enter(|| UdpSocket::bind(SocketAddr::new(to.ipv4().into(), 0)))?
        .with_context(|| format!("cannot bind in {}", to.netns().name()))?;
    let target = receiver.local_addr()?;
    receiver.set_read_timeout(Some(QUIET))?;
    let sender = from
        .netns()
        .enter(|| UdpSocket::bind(SocketAddr::new(from.ipv4().into(), 0)))?
        .with_context(|| format!("cannot bind in {}", from.netns().name()))?;
    let mut seen = vec![0u32; count as usize];
    let sent = std::thread::scope(|scope| {
        let sending = scope.spawn(|| -> anyhow::Result<()> {
            let mut payload = [0u8; 64];
            for seq in 0..count {
                payload[..4].copy_from_slice(&seq.to_be_bytes());
                sender
                    .send_to(&payload, target)
                    .with_context(|| format!("sending datagram {seq}"))?;
                // Pacing, not synchronisation: well below what the routers and the
                // receiver's socket buffer take, so only the tunnel can lose a datagram.
                if seq % 10 == 9 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Ok(())
        });
        let mut buf = [0u8; 128];
        while let Ok(n) = receiver.recv(&mut buf) {
            if let Some(number) = buf.get(..4).filter(|_| n >= 4) {
                let seq = u32::from_be_bytes([number[0], number[1], number[2], number[3]]);
                if let Some(slot) = seen.get_mut(seq as usize) {
                    *slot += 1;
                }
            }
        }
        sending
            .join()
            .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?
    });
    sent?;
    Ok(count_of(&seen))
}

fn count_of(seen: &[u32]) -> StreamCount {
    StreamCount {
        sent: seen.len() as u32,
        delivered: seen.iter().filter(|&&n| n > 0).count() as u32,
        missing: seen.iter().filter(|&&n| n == 0).count() as u32,
        duplicates: seen.iter().map(|&n| n.saturating_sub(1)).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_missing_and_repeated_numbers() {
        let count = count_of(&[1, 0, 3, 1]);
        assert_eq!(
            count,
            StreamCount {
                sent: 4,
                delivered: 3,
                missing: 1,
                duplicates: 2
            }
        );
    }
}
