//! CPU time from Linux's `/proc`, for the benchmarks.

/// User + system CPU seconds in the text of a process's or a thread's `stat` file.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    // The fields after the command's closing parenthesis; utime and stime are the 14th and
    // 15th of the whole line.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let used = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(used / ticks)
}

/// Each thread of process `pid` (`"self"` for this one) by name, with its user + system CPU
/// seconds. The kernel cuts a thread's name to 15 bytes (`ponte-checkpoint` reads
/// `ponte-checkpoin`); a thread that ends while it is being read is left out.
pub fn threads(pid: &str) -> std::io::Result<Vec<(String, f64)>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        if let Some(cpu) = cpu_seconds(&stat) {
            threads.push((name.trim_end().to_string(), cpu));
        }
    }
    Ok(threads)
}
