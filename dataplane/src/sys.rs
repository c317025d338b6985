//! The few Linux calls the drivers share, each wrapped once: waiting on descriptors (`poll`),
//! int socket options, thread ids and CPU sets. Nothing here knows about packets, workers or
//! devices; the drivers above it do.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;
use std::time::Duration;

/// Waits until one of `fds` (up to four; negative entries are ignored) is ready for `events`
/// (or has an error or hang-up to report) or the timeout passes. Returns which are ready: bit
/// `i` for `fds[i]`, so a caller reads only those (an empty read is a wasted syscall on the
/// latency path); 0 when none is.
pub(crate) fn poll_fds(fds: &[RawFd], events: libc::c_short, timeout: Duration) -> u32 {
    let mut pollfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let n = fds.len().min(pollfds.len());
    for (slot, fd) in pollfds.iter_mut().zip(fds) {
        slot.fd = *fd;
        slot.events = events;
    }
    // SAFETY: `pollfds[..n]` is a valid array of initialised pollfd structs.
    let ready = unsafe {
        libc::poll(
            pollfds.as_mut_ptr(),
            n as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    if ready <= 0 {
        return 0;
    }
    pollfds[..n]
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

/// Sets an int socket option.
pub(crate) fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a plain int option on a descriptor the caller owns; the pointer and length
    // describe `value`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs this process may run on (its affinity mask: a pod's cpuset, `taskset`).
pub(crate) fn allowed_cpus() -> io::Result<Vec<u32>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .map(|cpu| cpu as u32)
        .collect())
}

/// The calling thread's id (for [`set_thread_cpus`] from another thread).
pub(crate) fn current_thread_id() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux keeps a nice value per
/// thread), so that under CPU contention other threads run first.
pub(crate) fn set_current_thread_nice(nice: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integers; `who` is this thread's id.
    let rc =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, current_thread_id() as libc::id_t, nice) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets thread `tid` (0 = the caller) run only on `cpus`.
pub(crate) fn set_thread_cpus(tid: libc::pid_t, cpus: &[u32]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if (cpu as usize) < libc::CPU_SETSIZE as usize {
            // SAFETY: CPU_SET on a valid set with an index below CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        }
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn poll_names_only_the_ready_descriptors() {
        let (mut a_in, a) = UnixStream::pair().unwrap();
        let (mut b_in, b) = UnixStream::pair().unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        let wait = Duration::from_millis(1);
        assert_eq!(poll_fds(&fds, libc::POLLIN, wait), 0);
        b_in.write_all(b"x").unwrap();
        assert_eq!(poll_fds(&fds, libc::POLLIN, wait), 0b10);
        a_in.write_all(b"x").unwrap();
        assert_eq!(poll_fds(&fds, libc::POLLIN, wait), 0b11);
        // A negative entry is skipped, and the bits still follow the positions.
        assert_eq!(poll_fds(&[-1, b.as_raw_fd()], libc::POLLIN, wait), 0b10);
        // A hang-up counts as ready: the reader must look to learn of it.
        let (_, c) = UnixStream::pair().unwrap();
        assert_eq!(poll_fds(&[c.as_raw_fd()], libc::POLLIN, wait), 1);
    }
}
