//! The UAPI socket: binding `/var/run/wireguard/IFNAME.sock`, knowing whether it is still
//! ours, and serving `get=1` / `set=1` operations to `wg`, one thread per connection.
//!
//! Binding is race-free about permissions: the socket is bound inside a private 0700 staging
//! directory, made 0600, and only then hard-linked to its public name (a link never replaces
//! an existing file, so two daemons starting at once cannot steal each other's name). A
//! socket file that refuses connect() was left by a dead process and is removed; one that
//! accepts is live and binding fails with [`UapiError::InUse`].
//!
//! The accept loop polls with a short timeout so `stop` is honoured promptly, and checks
//! every second that the socket file is still the one it bound (same device and inode):
//! deleting the file is how an operator (or `wg`) tells a userspace WireGuard to exit.

use std::fs::{self, DirBuilder};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::DeviceControl;
use crate::uapi::format::format_get;
use crate::uapi::parse::{SetParser, MAX_LINE_LEN};

/// Where `wg` looks for userspace interfaces (shared by every network namespace on a host).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// Concurrent connections served; a connection over the cap waits up to [`SLOT_WAIT`] for a
/// slot, then is closed. `wg` uses two per command.
const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed, so a stuck client cannot pin a
/// thread forever.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply write that makes no progress for this long gives up on the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often blocked accepts and reads wake up to look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the accept loop checks that the socket file is still ours.
const OWNERSHIP_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a connection over the cap waits for a slot before it is closed: `wg` opens a
/// short connection before every command, and on a loaded node their threads may still be
/// finishing when the next one arrives.
const SLOT_WAIT: Duration = Duration::from_secs(1);

/// Why the UAPI socket could not be set up.
#[derive(Debug, Error)]
pub enum UapiError {
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "{}: another process is serving this interface (the socket accepts connections); \
         stop it or choose another interface name",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UapiError {
    let path = path.to_path_buf();
    move |source| UapiError::Io {
        context,
        path,
        source,
    }
}

/// Why [`UapiServer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeExit {
    /// The stop flag was set.
    Stopped,
    /// The socket file was deleted or replaced: the daemon is expected to exit.
    SocketLost,
}

/// Identifies the socket file a server bound, to tell later whether the file at that path is
/// still it. Cheap to clone; keep one to watch the socket after [`UapiServer::serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketWatch {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketWatch {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False once the socket file was deleted or replaced by another file.
    pub fn still_owned(&self) -> bool {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) => meta.dev() == self.dev && meta.ino() == self.ino,
            Err(_) => false,
        }
    }
}

/// A bound UAPI socket, ready to serve. Dropping it removes the socket file if it is still
/// the one this server bound.
#[derive(Debug)]
pub struct UapiServer {
    listener: UnixListener,
    watch: SocketWatch,
    max_connections: usize,
    idle_timeout: Duration,
}

impl UapiServer {
    /// Binds `/var/run/wireguard/IFNAME.sock`.
    pub fn bind(ifname: &str) -> Result<UapiServer, UapiError> {
        UapiServer::bind_in(Path::new(DEFAULT_SOCKET_DIR), ifname)
    }

    /// Binds `DIR/IFNAME.sock`, creating `dir` (0755) if needed. A stale socket file is
    /// replaced; a live one is an error.
    pub fn bind_in(dir: &Path, ifname: &str) -> Result<UapiServer, UapiError> {
        validate_ifname(ifname)?;
        create_socket_dir(dir)?;
        let path = dir.join(format!("{ifname}.sock"));
        remove_if_stale(&path)?;
        let (listener, watch) = bind_private(dir, ifname, &path)?;
        listener
            .set_nonblocking(true)
            .map_err(io_error("making nonblocking", &path))?;
        // The router logs one "running" line with the socket path once all is up.
        tracing::debug!(path = %path.display(), "UAPI socket listening");
        Ok(UapiServer {
            listener,
            watch,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        })
    }

    /// Changes how many connections are served at once (default 64, at least 1).
    pub fn with_max_connections(mut self, max: usize) -> UapiServer {
        self.max_connections = max.max(1);
        self
    }

    /// Changes how long a silent connection is kept (default 30 s).
    pub fn with_idle_timeout(mut self, idle: Duration) -> UapiServer {
        self.idle_timeout = idle;
        self
    }

    pub fn path(&self) -> &Path {
        &self.watch.path
    }

    /// False once the socket file was deleted or replaced (the router then exits).
    pub fn still_owned(&self) -> bool {
        self.watch.still_owned()
    }

    /// A handle to keep checking ownership after the server moved into its thread.
    pub fn watch(&self) -> SocketWatch {
        self.watch.clone()
    }

    /// Runs [`UapiServer::run`] on its own thread.
    pub fn serve(
        self,
        device: Arc<dyn DeviceControl>,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<ServeExit>, UapiError> {
        let path = self.watch.path.clone();
        thread::Builder::new()
            .name("uapi".into())
            .spawn(move || self.run(device, stop))
            .map_err(io_error("starting the server thread for", &path))
    }

    /// Accepts and serves connections until `stop` is set or the socket file stops being
    /// ours, then waits for the connection threads and removes the socket file (if ours).
    pub fn run(self, device: Arc<dyn DeviceControl>, stop: Arc<AtomicBool>) -> ServeExit {
        let flags = StopFlags {
            external: stop,
            internal: Arc::new(AtomicBool::new(false)),
        };
        let active = Arc::new(AtomicUsize::new(0));
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        let mut last_check = Instant::now();
        let exit = loop {
            if flags.external.load(Ordering::Relaxed) {
                break ServeExit::Stopped;
            }
            if last_check.elapsed() >= OWNERSHIP_CHECK_INTERVAL {
                last_check = Instant::now();
                if !self.still_owned() {
                    warn!(path = %self.path().display(), "UAPI socket was removed or replaced");
                    break ServeExit::SocketLost;
                }
            }
            if !wait_readable(&self.listener, POLL_INTERVAL) {
                continue;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    workers.retain(|w| !w.is_finished());
                    if let Some(worker) = self.start_connection(stream, &device, &flags, &active) {
                        workers.push(worker);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!("UAPI accept failed: {e}");
                    thread::sleep(POLL_INTERVAL);
                }
            }
        };
        flags.internal.store(true, Ordering::Relaxed);
        for worker in workers {
            // A panicking DeviceControl ends only its connection; nothing to do here.
            let _ = worker.join();
        }
        exit
    }

    fn start_connection(
        &self,
        stream: UnixStream,
        device: &Arc<dyn DeviceControl>,
        flags: &StopFlags,
        active: &Arc<AtomicUsize>,
    ) -> Option<JoinHandle<()>> {
        let deadline = Instant::now() + SLOT_WAIT;
        while active.load(Ordering::Relaxed) >= self.max_connections {
            if Instant::now() >= deadline || flags.external.load(Ordering::Relaxed) {
                warn!(
                    "UAPI: {} connections already open, closing a new one",
                    self.max_connections
                );
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let slot = ConnectionSlot::take(active);
        let device = Arc::clone(device);
        let flags = flags.clone();
        let idle = self.idle_timeout;
        let spawned = thread::Builder::new()
            .name("uapi-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(&stream, &*device, &flags, idle);
            });
        match spawned {
            Ok(worker) => Some(worker),
            Err(e) => {
                warn!("UAPI: cannot start a connection thread: {e}");
                None
            }
        }
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        // Never remove a socket another process has bound at the same path since.
        if self.still_owned() {
            if let Err(e) = fs::remove_file(self.path()) {
                warn!(path = %self.path().display(), "cannot remove UAPI socket: {e}");
            }
        }
    }
}

/// Counts a running connection for as long as it lives (also when its thread panics).
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(active: &Arc<AtomicUsize>) -> ConnectionSlot {
        active.fetch_add(1, Ordering::Relaxed);
        ConnectionSlot(Arc::clone(active))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The caller's stop flag, plus the server's own (set when the accept loop ends for another
/// reason, e.g. the socket was lost).
#[derive(Clone)]
struct StopFlags {
    external: Arc<AtomicBool>,
    internal: Arc<AtomicBool>,
}

impl StopFlags {
    fn is_set(&self) -> bool {
        self.external.load(Ordering::Relaxed) || self.internal.load(Ordering::Relaxed)
    }
}

fn validate_ifname(name: &str) -> Result<(), UapiError> {
    // The kernel's rules, which also keep the socket path inside its directory.
    match crate::tun::ifname_problem(name) {
        Some(reason) => Err(UapiError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn create_socket_dir(dir: &Path) -> Result<(), UapiError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io_error("creating", dir))?;
    // The mode above was filtered by the umask; `wg` run by root needs only to search it,
    // but the documented mode is 0755.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_error("chmod", dir))
}

/// Removes a socket file whose listener is gone (connect() refused); a live one is an error.
fn remove_if_stale(path: &Path) -> Result<(), UapiError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("inspecting", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(UapiError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        // The live server sees an empty connection, which it must treat as harmless.
        Ok(_) => Err(UapiError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => match fs::remove_file(path) {
            Ok(()) => {
                info!(path = %path.display(), "removed stale UAPI socket");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("removing stale socket", path)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("probing existing socket", path)(e)),
    }
}

static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

/// A private directory next to the socket, removed with everything in it when dropped.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Binds the socket under a private name, sets its mode, then links it to `path`.
fn bind_private(
    dir: &Path,
    ifname: &str,
    path: &Path,
) -> Result<(UnixListener, SocketWatch), UapiError> {
    let seq = STAGING_SEQ.fetch_add(1, Ordering::Relaxed);
    let staging = dir.join(format!(".{ifname}.{}.{seq}", std::process::id()));
    // Left over by an earlier process with the same pid that crashed mid-bind.
    let _ = fs::remove_dir_all(&staging);
    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_error("creating", &staging))?;
    let staging = StagingDir(staging);
    let private = staging.0.join("s");
    let listener = UnixListener::bind(&private).map_err(io_error("binding", &private))?;
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600))
        .map_err(io_error("chmod", &private))?;
    let meta = fs::symlink_metadata(&private).map_err(io_error("inspecting", &private))?;
    match fs::hard_link(&private, path) {
        Ok(()) => {}
        // Another daemon bound the name between our stale check and now.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(UapiError::InUse {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_error("linking socket to", path)(e)),
    }
    let watch = SocketWatch {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, watch))
}

/// Waits up to `timeout` for a connection to accept; false on timeout or interruption.
fn wait_readable(listener: &UnixListener, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd for the duration of the call, and the count says 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line (in the caller's buffer, without `\n`); the last one may lack its `\n`.
    Text,
    /// A line over [`MAX_LINE_LEN`], consumed and discarded.
    TooLong,
    /// The client closed its side.
    Eof,
}

/// Reads `\n`-terminated lines of bounded length from a socket with a short read timeout,
/// waking up to honour the stop flag and closing idle clients.
struct LineReader<R> {
    inner: BufReader<R>,
    stop: StopFlags,
    idle: Duration,
}

impl<R: Read> LineReader<R> {
    fn new(inner: R, stop: StopFlags, idle: Duration) -> LineReader<R> {
        LineReader {
            inner: BufReader::new(inner),
            stop,
            idle,
        }
    }

    fn next_line(&mut self, line: &mut Vec<u8>) -> io::Result<Line> {
        line.clear();
        let mut too_long = false;
        let mut idle_since = Instant::now();
        loop {
            let available = match self.inner.fill_buf() {
                Ok(available) => available,
                Err(e) if is_timeout(&e) => {
                    if self.stop.is_set() {
                        return Err(io::Error::other("server stopping"));
                    }
                    if idle_since.elapsed() >= self.idle {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "client idle"));
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok(match (too_long, line.is_empty()) {
                    (true, _) => Line::TooLong,
                    (false, true) => Line::Eof,
                    (false, false) => Line::Text,
                });
            }
            idle_since = Instant::now();
            let (chunk, consumed, complete) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            if !too_long {
                if line.len() + chunk.len() > MAX_LINE_LEN {
                    // Keep reading to the end of the line, but stop storing it.
                    too_long = true;
                    line.clear();
                } else {
                    line.extend_from_slice(chunk);
                }
            }
            self.inner.consume(consumed);
            if complete {
                return Ok(if too_long { Line::TooLong } else { Line::Text });
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn serve_connection(
    stream: &UnixStream,
    device: &dyn DeviceControl,
    stop: &StopFlags,
    idle: Duration,
) {
    let result = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(POLL_INTERVAL)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .and_then(|()| {
            let mut reader = LineReader::new(stream, stop.clone(), idle);
            run_operations(&mut reader, stream, device)
        });
    if let Err(e) = result {
        debug!("UAPI connection ended: {e}");
    }
}

/// Serves operations in sequence until the client closes, sends an unknown operation, or
/// an IO error occurs.
fn run_operations<R: Read>(
    reader: &mut LineReader<R>,
    out: &UnixStream,
    device: &dyn DeviceControl,
) -> io::Result<()> {
    let mut line = Vec::new();
    let mut reply = String::new();
    loop {
        match reader.next_line(&mut line)? {
            Line::Eof => return Ok(()),
            Line::TooLong => return Err(io::Error::other("operation line too long")),
            Line::Text => {}
        }
        reply.clear();
        match line.as_slice() {
            b"get=1" => match reader.next_line(&mut line)? {
                Line::Text if line.is_empty() => format_get(&device.get(), &mut reply),
                Line::Eof => return Ok(()),
                Line::Text | Line::TooLong => {
                    // wireguard-go answers EINVAL too; the stream is out of step, so close.
                    send_all(out, format!("errno=-{}\n\n", libc::EINVAL).as_bytes())?;
                    return Err(io::Error::other("trailing data after get=1"));
                }
            },
            b"set=1" => {
                let errno = read_and_apply_set(reader, &mut line, device)?;
                reply.push_str(&format!("errno={errno}\n\n"));
            }
            _ => {
                debug!("UAPI: unknown operation, closing the connection");
                return Ok(());
            }
        }
        send_all(out, reply.as_bytes())?;
    }
}

/// Reads a set body up to its blank line (or EOF), then applies it whole: returns 0 or a
/// negative errno for the reply.
fn read_and_apply_set<R: Read>(
    reader: &mut LineReader<R>,
    line: &mut Vec<u8>,
    device: &dyn DeviceControl,
) -> io::Result<i32> {
    let mut parser = SetParser::new();
    loop {
        match reader.next_line(line)? {
            Line::Eof => break,
            Line::Text if line.is_empty() => break,
            Line::Text => parser.feed(line),
            Line::TooLong => parser.line_too_long(),
        }
    }
    let update = match parser.finish() {
        Ok(update) => update,
        Err(e) => {
            warn!("UAPI set refused: {e}");
            return Ok(-e.errno());
        }
    };
    Ok(match device.set(update) {
        Ok(()) => 0,
        Err(e) => {
            warn!("UAPI set failed: {e}");
            // `wg` shows only negative values as an errno; never send 0 or a positive one.
            -e.errno().max(1)
        }
    })
}

/// Writes everything without raising SIGPIPE when the client is gone.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    while !buf.is_empty() {
        match sock.send_with_flags(buf, libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
