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
