//! Telemetry: structured logs in text or JSON, as configured.

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the configured level.
pub fn init(log: &LogSettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|from_env| EnvFilter::try_new(directives(&from_env)).ok())
        .or_else(|| EnvFilter::try_new(directives(&log.level)).ok())
        .unwrap_or_else(|| EnvFilter::new(directives("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The filter `level` asks for, with the AMQP client's own events off unless it names the
/// client (`lapin=…`). Ponte logs every broker failure itself, at WARN with the client's
/// reason; the client's events would repeat each at ERROR, report a clean close as an error
/// when the broker ends the socket first, and print a message the broker returns (a copy whose
/// queue is gone) whole: its payload, person identifiers included.
pub fn directives(level: &str) -> String {
    if level.contains("lapin") {
        level.to_string()
    } else if level.trim().is_empty() {
        "lapin=off".to_string()
    } else {
        format!("{level},lapin=off")
    }
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn the_amqp_client_is_quiet_unless_named() {
        assert_eq!(directives("info"), "info,lapin=off");
        assert_eq!(
            directives("warn,ponte::gateway=debug"),
            "warn,ponte::gateway=debug,lapin=off"
        );
        assert_eq!(directives("info,lapin=warn"), "info,lapin=warn");
        assert_eq!(directives(""), "lapin=off");
    }
}
