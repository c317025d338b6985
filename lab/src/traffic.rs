//! Traffic between namespaces: `ping`, and TCP transfers whose integrity is checked.
//!
//! [`tcp_transfer`] needs no tool in the pods: the test process creates the listening
//! socket inside the receiver's namespace and the connecting socket inside the sender's
//! (see [`Netns::enter`]), streams random bytes, and both ends checksum what they saw. The
//! receiver also records the source address of the connection, so a test can check that
//! the pod's own address arrived (no NAT on the way).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::netns::Netns;

/// Longest a transfer waits for the connection (covers a WireGuard handshake with retries).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a transfer waits for any progress once connected.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

const CHUNK: usize = 64 * 1024;

/// Pings `addr` from inside `ns` until `count` replies arrive, retrying lost requests, for
/// at most 10 s plus 0.2 s per reply (room for a handshake and a lost first packet).
pub fn ping(ns: &Netns, addr: IpAddr, count: u32) -> anyhow::Result<()> {
    ping_with_deadline(
        ns,
        addr,
        count,
        Duration::from_secs(10) + Duration::from_millis(200) * count,
    )
}

/// Pings `addr` from inside `ns`; succeeds when `count` replies arrive before `deadline`.
/// Use a short deadline to check that something is NOT reachable.
///
/// `ping -w` gives up at the first ICMP error (a node without the route yet answers "net
/// unreachable"), long before its deadline: such an early exit is retried with the time
/// left, so a route that appears within the deadline is waited for like a lost reply.
pub fn ping_with_deadline(
    ns: &Netns,
    addr: IpAddr,
    count: u32,
    deadline: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let count_arg = count.to_string();
    let addr_arg = addr.to_string();
    // `-w` takes whole seconds: the first attempt gets the whole deadline (at least 1 s), a
    // retry the whole seconds left.
    let mut seconds = deadline.as_secs().max(1);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let seconds_arg = seconds.to_string();
        let error = match ns.exec(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                &count_arg,
                "-i",
                "0.2",
                "-w",
                &seconds_arg,
                &addr_arg,
            ],
        ) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let left = deadline.saturating_sub(start.elapsed());
        if left < Duration::from_secs(1) {
            return Err(error).with_context(|| {
                format!(
                    "ping {addr} from {} ({count} replies within {} s, {attempts} attempt(s))",
                    ns.name(),
                    deadline.as_secs().max(1)
                )
            });
        }
        seconds = left.as_secs();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a [`tcp_transfer`] saw at both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    pub bytes_requested: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sent_checksum: u64,
    pub received_checksum: u64,
    /// The sender socket's local address.
    pub sender_addr: SocketAddr,
    /// The peer address the receiver's `accept` returned.
    pub source_seen_by_receiver: SocketAddr,
    pub elapsed: Duration,
    /// The sender's MSS at the end (TCP_MAXSEG).
    pub sender_mss: u32,
    /// Segments the sender's kernel retransmitted (`tcpi_total_retrans`).
    pub sender_retransmits: u32,
}

impl TransferReport {
    /// Checks that every byte arrived unchanged and that the receiver saw the sender's
    /// address, which must be `expected_source` (a pod address: nothing NATed it).
    pub fn verify(&self, expected_source: IpAddr) -> anyhow::Result<()> {
        if self.bytes_sent != self.bytes_requested || self.bytes_received != self.bytes_requested {
            anyhow::bail!(
                "requested {} bytes, sent {}, received {}",
                self.bytes_requested,
                self.bytes_sent,
                self.bytes_received
            );
        }
        if self.sent_checksum != self.received_checksum {
            anyhow::bail!(
                "checksum mismatch: sent {:016x}, received {:016x}",
                self.sent_checksum,
                self.received_checksum
            );
        }
        if self.source_seen_by_receiver != self.sender_addr
            || self.sender_addr.ip() != expected_source
        {
            anyhow::bail!(
                "receiver saw source {}, sender used {}, expected address {expected_source}",
                self.source_seen_by_receiver,
                self.sender_addr
            );
        }
        Ok(())
    }

    /// Retransmitted segments per segment the data needed (at the sender's MSS): about 0 on
    /// a path that loses nothing.
    pub fn retransmitted_share(&self) -> f64 {
        let segments = self.bytes_sent.div_ceil(u64::from(self.sender_mss.max(1)));
        f64::from(self.sender_retransmits) / segments.max(1) as f64
    }

    /// Megabits per second, for information only (tests never assert on time).
    pub fn mbit_per_second(&self) -> f64 {
        self.bytes_received as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Sends `bytes` random bytes over one TCP connection from a socket in `sender` to
/// `receiver_addr` (an address inside `receiver`), and reports what each end saw. Fails on
/// connection or I/O errors; the caller checks the content with [`TransferReport::verify`].
pub fn tcp_transfer(
    sender: &Netns,
    receiver: &Netns,
    receiver_addr: IpAddr,
    bytes: u64,
) -> anyhow::Result<TransferReport> {
    tcp_transfer_with_mss(sender, receiver, receiver_addr, bytes, None)
}

/// [`tcp_transfer`] with the sender's segments at most `mss` bytes (TCP_MAXSEG on the
/// listener: its SYN-ACK announces that MSS, and the sender must keep to it; Linux takes 88
/// to 65,535). Fails unless the sender's MSS is then at most `mss`.
pub fn tcp_transfer_with_mss(
    sender: &Netns,
    receiver: &Netns,
    receiver_addr: IpAddr,
    bytes: u64,
    mss: Option<u16>,
) -> anyhow::Result<TransferReport> {
    let listener = receiver
        .enter(|| TcpListener::bind(SocketAddr::new(receiver_addr, 0)))?
        .with_context(|| format!("cannot listen on {receiver_addr} in {}", receiver.name()))?;
    if let Some(mss) = mss {
        set_mss(&listener, mss).with_context(|| format!("cannot set MSS {mss}"))?;
    }
    let target = listener.local_addr()?;
    let abort = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let receiving = scope.spawn(|| receive(listener, &abort));
        let sent = send(sender, target, bytes);
        if sent.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        let received = receiving
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
        let (stream, bytes_sent, sent_checksum) =
            sent.with_context(|| format!("sending to {target} from {}", sender.name()))?;
        let sender_mss = u32::try_from(mss_of(&stream)?).unwrap_or(0);
        if let Some(mss) = mss {
            if sender_mss > u32::from(mss) {
                anyhow::bail!("the sender's MSS is {sender_mss}, above the {mss} asked for");
            }
        }
        let (source, bytes_received, received_checksum) =
            received.with_context(|| format!("receiving on {target} in {}", receiver.name()))?;
        Ok(TransferReport {
            bytes_requested: bytes,
            bytes_sent,
            bytes_received,
            sent_checksum,
            received_checksum,
            sender_addr: stream.local_addr()?,
            source_seen_by_receiver: source,
            elapsed: started.elapsed(),
            sender_mss,
            sender_retransmits: retransmits_of(&stream)?,
        })
    })
}

/// Sets TCP_MAXSEG on a socket.
fn set_mss(socket: &impl AsRawFd, mss: u16) -> std::io::Result<()> {
    set_int_option(
        socket,
        libc::IPPROTO_TCP,
        libc::TCP_MAXSEG,
        libc::c_int::from(mss),
    )
}

/// Sets an int-valued socket option (`setsockopt(level, name)`).
pub fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: an int option on a descriptor the caller owns; pointer and length describe it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A connected socket's MSS (TCP_MAXSEG reads back the one in use).
fn mss_of(socket: &impl AsRawFd) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option read into `value`, whose size `len` gives.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// Segments the kernel retransmitted on a connection so far (`tcpi_total_retrans`).
fn retransmits_of(socket: &impl AsRawFd) -> std::io::Result<u32> {
    // SAFETY: an all-zero tcp_info is a valid value to be overwritten.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.tcpi_total_retrans)
}

/// Connects from inside `ns` and writes `bytes` random bytes, then half-closes. Returns the
/// stream (kept open until the receiver is done), the count and the checksum.
fn send(ns: &Netns, target: SocketAddr, bytes: u64) -> anyhow::Result<(TcpStream, u64, u64)> {
    let mut stream = ns
        .enter(|| TcpStream::connect_timeout(&target, CONNECT_TIMEOUT))?
        .with_context(|| format!("cannot connect to {target}"))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut random = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    let mut buf = vec![0u8; CHUNK];
    let mut checksum = Checksum::new();
    let mut sent = 0u64;
    while sent < bytes {
        let n = usize::try_from(bytes - sent).map_or(CHUNK, |left| left.min(CHUNK));
        random.read_exact(&mut buf[..n])?;
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("write failed after {sent} bytes"))?;
        checksum.update(&buf[..n]);
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok((stream, sent, checksum.finish()))
}

/// Accepts one connection (giving up when `abort` is set or after [`CONNECT_TIMEOUT`]) and
/// reads it to the end. Returns the peer address, the byte count and the checksum.
fn receive(listener: TcpListener, abort: &AtomicBool) -> anyhow::Result<(SocketAddr, u64, u64)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(5);
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if abort.load(Ordering::Relaxed) {
                    anyhow::bail!("sender gave up before connecting");
                }
                if Instant::now() > deadline {
                    anyhow::bail!("no connection within {CONNECT_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept failed"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 4 * CHUNK];
    let mut checksum = Checksum::new();
    let mut received = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("read failed after {received} bytes")),
        };
        checksum.update(&buf[..n]);
        received += n as u64;
    }
    Ok((peer, received, checksum.finish()))
}

/// A 64-bit streaming checksum over a byte stream: the result depends on every byte and its
/// position, and not on how the stream was cut into reads. Catches loss, corruption,
/// duplication and reordering; not meant to resist an adversary.
#[derive(Debug, Clone)]
pub struct Checksum {
    state: u64,
    pending: [u8; 8],
    pending_len: usize,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

impl Checksum {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    pub fn new() -> Checksum {
        Checksum {
            state: 0x6a09_e667_f3bc_c909,
            pending: [0; 8],
            pending_len: 0,
            len: 0,
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.pending_len > 0 {
            let take = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let mut words = data.chunks_exact(8);
        for word in &mut words {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            self.mix(u64::from_le_bytes(bytes));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The checksum of everything fed so far (including its length).
    pub fn finish(mut self) -> u64 {
        if self.pending_len > 0 {
            let mut last = [0u8; 8];
            last[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
            self.mix(u64::from_le_bytes(last));
        }
        self.mix(self.len);
        // The splitmix64 finalizer, so that every input bit affects every output bit.
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn mix(&mut self, word: u64) {
        // xor, odd multiply and rotate are each invertible: two streams that differ in one
        // word end in different states until further words happen to cancel it out.
        self.state = (self.state ^ word)
            .wrapping_mul(Self::MULTIPLIER)
            .rotate_left(29);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(chunks: &[&[u8]]) -> u64 {
        let mut c = Checksum::new();
        for chunk in chunks {
            c.update(chunk);
        }
        c.finish()
    }

    fn data() -> Vec<u8> {
        (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn independent_of_how_the_stream_is_cut() {
        let data = data();
        let whole = checksum(&[&data]);
        for cut in [1, 3, 7, 8, 9, 500, 999] {
            let (a, b) = data.split_at(cut);
            assert_eq!(checksum(&[a, b]), whole, "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(checksum(&bytewise), whole);
    }

    #[test]
    fn detects_change_loss_duplication_and_reordering() {
        let data = data();
        let whole = checksum(&[&data]);
        let mut flipped = data.clone();
        flipped[500] ^= 1;
        assert_ne!(checksum(&[&flipped]), whole);
        assert_ne!(checksum(&[&data[..999]]), whole);
        assert_ne!(checksum(&[&data, &data[999..]]), whole);
        assert_ne!(checksum(&[&data[8..16], &data[..8], &data[16..]]), whole);
    }

    #[test]
    fn trailing_zeros_and_empty_input_are_distinguished_by_length() {
        assert_ne!(checksum(&[]), checksum(&[&[0]]));
        assert_ne!(checksum(&[&[1, 0]]), checksum(&[&[1]]));
    }

    fn report() -> TransferReport {
        let source: SocketAddr = "198.19.1.2:40000".parse().unwrap();
        TransferReport {
            bytes_requested: 10,
            bytes_sent: 10,
            bytes_received: 10,
            sent_checksum: 7,
            received_checksum: 7,
            sender_addr: source,
            source_seen_by_receiver: source,
            elapsed: Duration::from_secs(1),
            sender_mss: 1380,
            sender_retransmits: 0,
        }
    }

    #[test]
    fn verify_accepts_an_intact_transfer_from_the_expected_source() {
        report().verify("198.19.1.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn verify_rejects_short_corrupt_or_natted_transfers() {
        let expected: IpAddr = "198.19.1.2".parse().unwrap();
        let mut short = report();
        short.bytes_received = 9;
        assert!(short.verify(expected).is_err());
        let mut corrupt = report();
        corrupt.received_checksum = 8;
        assert!(corrupt.verify(expected).is_err());
        let mut natted = report();
        natted.source_seen_by_receiver = "198.18.0.1:40000".parse().unwrap();
        assert!(natted.verify(expected).is_err());
        assert!(report().verify("198.19.1.3".parse().unwrap()).is_err());
    }
}
