//! The threads of a running process as /proc shows them: name, the CPUs each may run on,
//! how often each woke up. Where the router placed its workers is a fact the tests read
//! here, not in its log.

/// One thread of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// `comm`, e.g. `tsk-tun0`.
    pub name: String,
    /// `Cpus_allowed_list`, e.g. `1` or `0-1`.
    pub cpus: String,
    /// `voluntary_ctxt_switches`: a thread that blocks in poll between batches wakes up
    /// once per switch.
    pub wakeups: u64,
}

impl Thread {
    /// Whether the thread may run on one CPU only.
    pub fn on_one_cpu(&self) -> bool {
        self.cpus.parse::<u32>().is_ok()
    }
}

/// The threads of process `pid` (none if it is gone).
pub fn threads(pid: u32) -> Vec<Thread> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .map(|task| {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            Thread {
                name: comm.trim().to_string(),
                cpus: field("Cpus_allowed_list:"),
                wakeups: field("voluntary_ctxt_switches:").parse().unwrap_or(0),
            }
        })
        .collect()
}

/// The thread named `name` of `pid`; panics, listing the threads, if there is none.
pub fn thread(pid: u32, name: &str) -> Thread {
    let all = threads(pid);
    all.iter()
        .find(|t| t.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no thread {name} in process {pid}: {all:?}"))
}

/// The packet worker threads of a tailsk8s router (`tsk-tunN`, `tsk-udpN`).
pub fn worker_threads(pid: u32) -> Vec<Thread> {
    threads(pid)
        .into_iter()
        .filter(|t| t.name.starts_with("tsk-tun") || t.name.starts_with("tsk-udp"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_thread_named_like_the_test() {
        let name = "threads-probe";
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(|| thread(std::process::id(), "threads-probe"))
            .unwrap();
        let seen = handle.join().unwrap();
        assert_eq!(seen.name, name);
        assert!(!seen.cpus.is_empty());
    }
}
