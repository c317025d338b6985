//! A TCP stream from one pod to another, as fast as it goes, whose receiver times every
//! read: the longest time between two arrivals of bytes is the longest the stream stalled.
//! It runs while the caller does something to the routers (churns their peers), so a lock or
//! a route rewrite that holds up the data path shows as a gap, measured where the pod sees it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::topology::Pod;
use crate::wait;

/// The receiver's read timeout: how often it looks at the stop flag while nothing arrives.
const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Bytes that must have arrived before the measured part begins (slow start is over).
const WARM_UP_BYTES: u64 = 4 << 20;

/// What the receiving pod saw while the caller's work ran.
#[derive(Debug, Clone, Copy)]
pub struct StallReport {
    /// Bytes received while the work ran.
    pub bytes: u64,
    /// How long the work ran.
    pub elapsed: Duration,
    /// The longest time with no byte arriving (including the time from the last arrival to
    /// the end of the work).
    pub longest_gap: Duration,
    /// When the longest gap ended, from the start of the work.
    pub longest_gap_at: Duration,
    /// Gaps of 100 ms or more.
    pub gaps_over_100ms: u32,
}

impl StallReport {
    pub fn mbit_per_second(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Streams from `from` to `to` (IPv4), waits until it is flowing, runs `work`, then stops the
/// stream and reports what arrived while `work` ran. Fails when the stream fails (a
/// connection error is not a stall: the transfer must survive the work).
pub fn while_streaming<T: Send>(
    from: &Pod,
    to: &Pod,
    work: impl FnOnce() -> T + Send,
) -> anyhow::Result<(T, StallReport)> {
    let listener = to
        .netns()
        .enter(|| TcpListener::bind(SocketAddr::new(to.ipv4().into(), 0)))?
        .with_context(|| format!("cannot listen in {}", to.netns().name()))?;
    let target = listener.local_addr()?;
    let stream = from
        .netns()
        .enter(|| TcpStream::connect(target))?
        .with_context(|| format!("cannot connect to {target} from {}", from.netns().name()))?;
    let (received, _) = listener.accept().context("accepting the stream")?;
    received.set_read_timeout(Some(READ_TIMEOUT))?;
    let stop = AtomicBool::new(false);
    let measuring = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    std::thread::scope(|scope| -> anyhow::Result<(T, StallReport)> {
        let sending = scope.spawn(|| send(stream, &stop));
        let receiving = scope.spawn(|| receive(received, &stop, &measuring, &total));
        let flowing = wait::until("the stream flows", Duration::from_secs(20), || {
            Ok((total.load(Ordering::Relaxed) >= WARM_UP_BYTES).then_some(()))
        });
        // Set even when `work` panics: the scope waits for the stream's threads.
        let stopping = StopOnDrop(&stop);
        let result = flowing.map(|()| {
            measuring.store(true, Ordering::Relaxed);
            work()
        });
        drop(stopping);
        let sent = sending
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        let report = receiving
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        let result = result?;
        sent.context("sending")?;
        Ok((result, report.context("receiving")?))
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn send(mut stream: TcpStream, stop: &AtomicBool) -> anyhow::Result<()> {
    let buf = vec![0x5a_u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = stream.write_all(&buf) {
            // The receiver closes once the work is over; only an earlier error is one.
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

fn receive(
    mut stream: TcpStream,
    stop: &AtomicBool,
    measuring: &AtomicBool,
    total: &AtomicU64,
) -> anyhow::Result<StallReport> {
    let mut buf = vec![0u8; 256 << 10];
    let mut started: Option<Instant> = None;
    let mut last = Instant::now();
    let mut report = StallReport {
        bytes: 0,
        elapsed: Duration::ZERO,
        longest_gap: Duration::ZERO,
        longest_gap_at: Duration::ZERO,
        gaps_over_100ms: 0,
    };
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        total.fetch_add(n as u64, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match started {
            None if measuring.load(Ordering::Relaxed) => started = Some(now),
            None => {}
            Some(start) => {
                report.bytes += n as u64;
                record_gap(&mut report, now - last, now - start);
            }
        }
        last = now;
    }
    let start = started.context("the work never started")?;
    let end = Instant::now();
    report.elapsed = end - start;
    // A stream that stopped for good stalled until the end.
    record_gap(
        &mut report,
        end.saturating_duration_since(last),
        end - start,
    );
    Ok(report)
}

fn record_gap(report: &mut StallReport, gap: Duration, at: Duration) {
    if gap >= Duration::from_millis(100) {
        report.gaps_over_100ms += 1;
    }
    if gap > report.longest_gap {
        report.longest_gap = gap;
        report.longest_gap_at = at;
    }
}
