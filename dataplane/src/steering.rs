//! Worker affinity: which worker serves a packet. Pinned, each worker's threads run on one
//! CPU and the kernel hands a packet to the worker of the CPU it is on — the TUN through a
//! steering eBPF program (`TUNSETSTEERINGEBPF`), the listen sockets through a reuseport
//! classic-BPF program (`SO_ATTACH_REUSEPORT_CBPF`). Spread, threads run anywhere and the
//! kernel's flow hash picks the worker.
//!
//! Why pin: on a VM, waking a thread that sleeps on another, idle vCPU costs tens of
//! microseconds, and a round trip through a userspace router needs several wake-ups. With the
//! worker of the sending CPU serving the packet, a pod's request, both routers and the reply
//! stay on the CPU the pod sent from, and each wake-up is a cheap local switch. Why spread: a
//! busy flow then shares its CPU with the application, halving its throughput on small
//! nodes. [`Adaptive`] pins while the device is quiet and spreads while it is busy.
//!
//! Everything here is best effort: without CAP_BPF, on old kernels or in a cpuset that
//! cannot be read, the device stays spread.

use std::io;
use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `TUNSETSTEERINGEBPF` = `_IOR('T', 224, int)`.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
/// `SO_DETACH_REUSEPORT_BPF` (Linux 5.3; the same number on every architecture but
/// mips/parisc/sparc, which the router does not build for).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;
/// The kernel's license check only matters for GPL-only helpers; the one used here is not.
const LICENSE: &[u8] = b"Apache-2.0\0";

/// How workers are placed on CPUs (`worker_affinity` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerAffinity {
    /// Pinned while quiet, spread while busy (see [`Adaptive`]).
    #[default]
    Adaptive,
    /// Always pinned: the lowest latency, less throughput per busy flow.
    Pinned,
    /// Never pinned: the kernel's flow hash picks the worker.
    Off,
}

impl WorkerAffinity {
    pub const NAMES: [&'static str; 3] = ["adaptive", "pinned", "off"];

    pub fn name(self) -> &'static str {
        match self {
            WorkerAffinity::Adaptive => "adaptive",
            WorkerAffinity::Pinned => "pinned",
            WorkerAffinity::Off => "off",
        }
    }
}

impl std::str::FromStr for WorkerAffinity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "adaptive" => Ok(WorkerAffinity::Adaptive),
            "pinned" => Ok(WorkerAffinity::Pinned),
            "off" => Ok(WorkerAffinity::Off),
            other => Err(format!(
                "unknown worker affinity `{other}` (expected one of: {})",
                WorkerAffinity::NAMES.join(", ")
            )),
        }
    }
}

/// Packets (TUN reads plus datagrams received) in one timer tick above which an adaptive
/// device spreads its workers: 1,000 per 100 ms is ~115 Mbit/s of full-size packets, a few
/// per cent of one core — far above request/response traffic (a ping every millisecond is
/// 200 per tick on each router), far below one busy flow.
pub const SPREAD_ABOVE_PER_TICK: u64 = 1_000;
/// Packets per tick below which a tick counts as quiet.
pub const QUIET_BELOW_PER_TICK: u64 = 300;
/// Quiet ticks in a row before an adaptive device pins its workers again (1 s at 100 ms), so
/// a flow pausing briefly does not flap between the modes.
pub const QUIET_TICKS_TO_PIN: u32 = 10;

/// The adaptive mode's decision, fed the packet count of each timer tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adaptive {
    pinned: bool,
    quiet_ticks: u32,
}

impl Default for Adaptive {
    /// A fresh device is quiet: pinned.
    fn default() -> Self {
        Adaptive {
            pinned: true,
            quiet_ticks: 0,
        }
    }
}

impl Adaptive {
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Takes one tick's packet count; returns the new placement (`true` = pinned) when it
    /// changes.
    pub fn observe(&mut self, packets: u64) -> Option<bool> {
        if self.pinned {
            if packets > SPREAD_ABOVE_PER_TICK {
                self.pinned = false;
                self.quiet_ticks = 0;
                return Some(false);
            }
            return None;
        }
        if packets < QUIET_BELOW_PER_TICK {
            self.quiet_ticks += 1;
            if self.quiet_ticks >= QUIET_TICKS_TO_PIN {
                self.pinned = true;
                self.quiet_ticks = 0;
                return Some(true);
            }
        } else {
            self.quiet_ticks = 0;
        }
        None
    }
}

/// The CPU each worker is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuMap {
    /// `cpus[k]` is worker `k`'s CPU.
    cpus: Vec<u32>,
}

impl CpuMap {
    /// Worker `k` on `allowed[k]` (the CPUs this process may run on: [`allowed_cpus`]);
    /// `None` when pinning makes no sense: one worker (the scheduler places it best) or more
    /// workers than CPUs.
    pub fn from_allowed(allowed: &[u32], workers: usize) -> Option<CpuMap> {
        if workers < 2 || workers > allowed.len() {
            return None;
        }
        Some(CpuMap {
            cpus: allowed[..workers].to_vec(),
        })
    }

    pub fn cpu_of(&self, worker: usize) -> u32 {
        self.cpus[worker % self.cpus.len()]
    }

    /// Classic BPF for a reuseport group whose `k`-th socket is worker `k`'s: returns the
    /// index of the current CPU's worker, or an out-of-range index (the kernel then falls
    /// back to its hash) on a CPU without a worker.
    fn reuseport_program(&self) -> Vec<libc::sock_filter> {
        const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
        const SKF_AD_CPU: u32 = 36;
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let mut program = vec![stmt(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            SKF_AD_OFF + SKF_AD_CPU,
        )];
        for (worker, &cpu) in self.cpus.iter().enumerate() {
            // Equal: fall through to the return; not equal: skip it.
            program.push(libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: cpu,
            });
            program.push(stmt(libc::BPF_RET | libc::BPF_K, worker as u32));
        }
        program.push(stmt(libc::BPF_RET | libc::BPF_K, u32::MAX));
        program
    }

    /// eBPF for the TUN: the current CPU's worker as the queue index (the kernel takes the
    /// result modulo the queue count, so a CPU without a worker still gets a valid queue).
    fn tun_program(&self) -> Vec<BpfInsn> {
        const BPF_FUNC_GET_SMP_PROCESSOR_ID: i32 = 8;
        let mut program = vec![BpfInsn::call(BPF_FUNC_GET_SMP_PROCESSOR_ID)];
        for (worker, &cpu) in self.cpus.iter().enumerate() {
            // if r0 == cpu { r0 = worker; exit }
            program.push(BpfInsn::jump_if_equal(cpu as i32, 1));
            program.push(BpfInsn::jump(2));
            program.push(BpfInsn::mov_r0(worker as i32));
            program.push(BpfInsn::exit());
        }
        program.push(BpfInsn::exit());
        program
    }
}

/// The CPUs this process may run on (its affinity mask: a pod's cpuset, `taskset`).
pub fn allowed_cpus() -> io::Result<Vec<u32>> {
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
pub fn current_thread_id() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Lets thread `tid` (0 = the caller) run only on `cpus`.
pub fn set_thread_cpus(tid: libc::pid_t, cpus: &[u32]) -> io::Result<()> {
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

/// With a map, makes the reuseport group of `socket` (whose `k`-th member is worker `k`'s)
/// deliver to the worker of the receiving CPU; without, gives the group back to the
/// kernel's hash.
pub fn steer_reuseport_group(socket: RawFd, map: Option<&CpuMap>) -> io::Result<()> {
    let Some(map) = map else {
        return match crate::udp::set_int_option(
            socket,
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            0,
        ) {
            // ENOENT: no program was attached.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        };
    };
    let mut program = map.reuseport_program();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// With a map, makes the TUN (any of its queues' fds) queue a packet for the worker of the
/// CPU that sends it into the TUN; without, gives the choice back to the kernel's flow hash.
pub fn steer_tun(queue: RawFd, map: Option<&CpuMap>) -> io::Result<()> {
    let program = map
        .map(|map| load_socket_filter(&map.tun_program()))
        .transpose()?;
    // -1 detaches the program.
    let fd: libc::c_int = program.as_ref().map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: the ioctl reads one int (a program's fd, or -1); the TUN takes its own
    // reference to the program, so ours may close afterwards.
    let rc = unsafe { libc::ioctl(queue, TUNSETSTEERINGEBPF as _, &fd) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BpfInsn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

impl BpfInsn {
    const JMP: u8 = 0x05;
    const ALU64: u8 = 0x07;

    fn call(helper: i32) -> BpfInsn {
        BpfInsn {
            code: Self::JMP | 0x80,
            regs: 0,
            off: 0,
            imm: helper,
        }
    }

    /// `if r0 == imm goto +off`.
    fn jump_if_equal(imm: i32, off: i16) -> BpfInsn {
        BpfInsn {
            code: Self::JMP | 0x10,
            regs: 0,
            off,
            imm,
        }
    }

    /// `goto +off`.
    fn jump(off: i16) -> BpfInsn {
        BpfInsn {
            code: Self::JMP,
            regs: 0,
            off,
            imm: 0,
        }
    }

    /// `r0 = imm`.
    fn mov_r0(imm: i32) -> BpfInsn {
        BpfInsn {
            code: Self::ALU64 | 0xb0,
            regs: 0,
            off: 0,
            imm,
        }
    }

    fn exit() -> BpfInsn {
        BpfInsn {
            code: Self::JMP | 0x90,
            regs: 0,
            off: 0,
            imm: 0,
        }
    }
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel zero-extends a
/// shorter attribute).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    /// Named so it is zero: padding here would be read as flags.
    prog_flags: u32,
}

fn load_socket_filter(program: &[BpfInsn]) -> io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: `attr` and the buffers it points at outlive the call; the size is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            size_of::<ProgLoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_spreads_at_once_when_busy_and_pins_after_a_quiet_second() {
        let mut a = Adaptive::default();
        assert!(a.pinned());
        assert_eq!(
            a.observe(SPREAD_ABOVE_PER_TICK),
            None,
            "at the threshold: stays"
        );
        assert_eq!(a.observe(SPREAD_ABOVE_PER_TICK + 1), Some(false));
        assert_eq!(a.observe(100_000), None);
        // Quiet ticks, interrupted by a moderate one: the count starts over.
        for _ in 0..QUIET_TICKS_TO_PIN - 1 {
            assert_eq!(a.observe(0), None);
        }
        assert_eq!(a.observe(QUIET_BELOW_PER_TICK), None, "not quiet");
        for _ in 0..QUIET_TICKS_TO_PIN - 1 {
            assert_eq!(a.observe(QUIET_BELOW_PER_TICK - 1), None);
        }
        assert_eq!(a.observe(0), Some(true));
        assert!(a.pinned());
    }

    #[test]
    fn affinity_names_round_trip_and_unknown_ones_are_refused() {
        for name in WorkerAffinity::NAMES {
            assert_eq!(name.parse::<WorkerAffinity>().unwrap().name(), name);
        }
        let err = "pinnned".parse::<WorkerAffinity>().unwrap_err();
        assert!(err.contains("adaptive, pinned, off"), "{err}");
        assert_eq!(WorkerAffinity::default(), WorkerAffinity::Adaptive);
    }

    #[test]
    fn workers_take_the_allowed_cpus_in_order() {
        let map = CpuMap::from_allowed(&[2, 5, 7], 2).unwrap();
        assert_eq!((map.cpu_of(0), map.cpu_of(1)), (2, 5));
        assert_eq!(
            CpuMap::from_allowed(&[0, 1], 1),
            None,
            "one worker is not pinned"
        );
        assert_eq!(
            CpuMap::from_allowed(&[0, 1], 3),
            None,
            "more workers than CPUs"
        );
    }

    #[test]
    fn the_reuseport_program_returns_the_cpus_worker_or_out_of_range() {
        let map = CpuMap::from_allowed(&[3, 9], 2).unwrap();
        let program = map.reuseport_program();
        // Interpret it for each CPU: the load, then (jeq, ret) pairs, then the fallback.
        let run = |cpu: u32| -> u32 {
            let mut pc = 1;
            loop {
                let insn = &program[pc];
                if insn.code == (libc::BPF_RET | libc::BPF_K) as u16 {
                    return insn.k;
                }
                pc += 1 + if insn.k == cpu { insn.jt } else { insn.jf } as usize;
            }
        };
        assert_eq!(run(3), 0);
        assert_eq!(run(9), 1);
        assert_eq!(run(4), u32::MAX);
    }

    #[test]
    fn the_tun_program_is_accepted_by_the_kernel_verifier() {
        let map = CpuMap::from_allowed(&[0, 1, 2, 3], 4).unwrap();
        match load_socket_filter(&map.tun_program()) {
            Ok(_) => {}
            // Unprivileged test runs may not load programs at all; root runs must.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && !is_root() => {}
            Err(e) => panic!("the verifier refused the steering program: {e}"),
        }
    }

    fn is_root() -> bool {
        // SAFETY: plain syscall without arguments.
        unsafe { libc::geteuid() == 0 }
    }
}
