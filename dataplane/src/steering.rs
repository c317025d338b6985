//! The mechanisms of worker affinity: which worker serves a packet when workers are pinned.
//! A [`CpuMap`] names each worker's CPU; from it come the two programs through which the
//! kernel hands a packet to the worker of the CPU it is on — the TUN's steering eBPF program
//! (`TUNSETSTEERINGEBPF`) and the listen sockets' reuseport classic-BPF program
//! (`SO_ATTACH_REUSEPORT_CBPF`) — and their detachment, which gives the choice back to the
//! kernel's flow hash. When to pin and when to spread is policy: [`crate::affinity`].
//!
//! Everything here is best effort: without CAP_BPF or on old kernels the callers keep the
//! kernel's hash.

use std::io;
use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::sys;

/// The kernel's license check only matters for GPL-only helpers; the one used here is not.
const LICENSE: &[u8] = b"Apache-2.0\0";

/// The CPU each worker is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuMap {
    /// `cpus[k]` is worker `k`'s CPU.
    cpus: Vec<u32>,
}

impl CpuMap {
    /// Worker `k` on `allowed[k]` (the CPUs this process may run on: `sys::allowed_cpus`);
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
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let mut program = vec![stmt(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
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

/// With a map, makes the reuseport group of `socket` (whose `k`-th member is worker `k`'s)
/// deliver to the worker of the receiving CPU; without, gives the group back to the
/// kernel's hash.
pub fn steer_reuseport_group(socket: RawFd, map: Option<&CpuMap>) -> io::Result<()> {
    let Some(map) = map else {
        return match sys::set_int_option(socket, libc::SOL_SOCKET, libc::SO_DETACH_REUSEPORT_BPF, 0)
        {
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
    let rc = unsafe { libc::ioctl(queue, libc::TUNSETSTEERINGEBPF, &fd) };
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
