//! Command-line and logging conventions the two binaries share with the reference:
//! Go-style single-dash long flags, its log level names, its version line, and logs as
//! JSON lines (the reference's logrus keys `time`, `level`, `msg`) or as text; and
//! the one library error line that is no error (see [`InterruptedReplies`]).

use std::ffi::OsString;

use anyhow::{Context, Result};
use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// `--version`'s text after the program name: `v<version> <git revision>`, as the
/// reference prints `containerd-stargz-grpc v0.18.2 <revision>`.
pub const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"), " ", env!("STARGZ_REVISION"));

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the reference's keys.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Rewrites Go-style flags (`-address x`, `-log-level=debug`, `-version`) to the
/// double-dash form for the long options named in `long`; anything else, and
/// everything after `--`, is left as it is.
pub fn go_style_args<I: IntoIterator<Item = OsString>>(args: I, long: &[&str]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || rest {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(arg);
            continue;
        }
        let rewritten = s
            .strip_prefix('-')
            .filter(|r| !r.starts_with('-'))
            .filter(|r| long.contains(&r.split_once('=').map_or(*r, |(name, _)| name)))
            .map(|r| OsString::from(format!("--{r}")));
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

/// The tracing filter for a `--log-level`: the reference's names (`trace`, `debug`,
/// `info`, `warn`/`warning`, `error`, `fatal`, `panic`; the last two log errors only),
/// or a tracing filter directive.
pub fn level_filter(level: &str) -> Result<tracing_subscriber::EnvFilter> {
    let directive = match level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_string(),
        "fatal" | "panic" => "error".to_string(),
        _ => level.to_string(),
    };
    tracing_subscriber::EnvFilter::try_new(&directive).with_context(|| {
        format!(
            "--log-level {level:?}: not one of trace, debug, info, warn, error, fatal, panic, \
             nor a tracing filter"
        )
    })
}

/// Installs the process's logger: to stderr, in `format`, colours only on a terminal
/// (and never in JSON), without [`InterruptedReplies`].
pub fn init(level: &str, format: LogFormat) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = level_filter(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(InterruptedReplies)
            .try_init()?,
        LogFormat::Json => builder
            .with_ansi(false)
            .event_format(JsonLines)
            .finish()
            .with(InterruptedReplies)
            .try_init()?,
    }
    Ok(())
}

/// Leaves out `fuser`'s `Failed to send FUSE reply: No such file or directory`: the
/// kernel answers a reply with ENOENT when it no longer waits for the request (the
/// process that read was interrupted, as happens while a container starts), so
/// nothing went wrong, yet fuser logs it as an error, often a dozen at once. Any
/// other failed reply is still logged.
pub struct InterruptedReplies;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for InterruptedReplies {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let meta = event.metadata();
        // Events of the `log` crate (which fuser uses) come with target `log` and the
        // real one in a field.
        if meta.target() != "fuser::reply" && meta.target() != "log" {
            return true;
        }
        let mut seen = ReplyFields::default();
        event.record(&mut seen);
        let from_fuser = meta.target() == "fuser::reply" || seen.log_target == "fuser::reply";
        !(from_fuser
            && seen.message.starts_with("Failed to send FUSE reply")
            && seen.message.contains("No such file or directory"))
    }
}

#[derive(Default)]
struct ReplyFields {
    message: String,
    log_target: String,
}

impl Visit for ReplyFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = value.to_string(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

/// One JSON object per event: `time` (RFC 3339, UTC, nanoseconds), `level` (logrus'
/// names: `warning` for warn), `msg`, then the event's fields and those of its spans.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Fields::default();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                // Span fields are kept as formatted text; each span's under its name.
                let ext = span.extensions();
                if let Some(text) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>() {
                    if !text.fields.is_empty() {
                        fields
                            .map
                            .insert(span.name().to_string(), text.fields.clone().into());
                    }
                }
            }
        }
        event.record(&mut fields);
        let level = match *event.metadata().level() {
            tracing::Level::TRACE => "trace",
            tracing::Level::DEBUG => "debug",
            tracing::Level::INFO => "info",
            tracing::Level::WARN => "warning",
            tracing::Level::ERROR => "error",
        };
        let mut obj = serde_json::Map::new();
        obj.insert("time".into(), rfc3339_now().into());
        obj.insert("level".into(), level.into());
        obj.insert(
            "msg".into(),
            fields.message.take().unwrap_or_default().into(),
        );
        for (k, v) in fields.map {
            // The three keys above stay the reference's.
            let k = if matches!(k.as_str(), "time" | "level" | "msg") {
                format!("fields.{k}")
            } else {
                k
            };
            obj.insert(k, v);
        }
        let line = serde_json::Value::Object(obj).to_string();
        writer.write_str(&line)?;
        writer.write_char('\n')
    }
}

#[derive(Default)]
struct Fields {
    message: Option<String>,
    map: serde_json::Map<String, serde_json::Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: serde_json::Value) {
        if field.name() == "message" {
            self.message = Some(match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.map.insert(field.name().to_string(), v);
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_nanos())
}

fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for a subscriber's output.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `emit` logs through a text logger with [`InterruptedReplies`].
    fn logged_without_interrupted_replies(emit: impl FnOnce()) -> String {
        use tracing_subscriber::layer::SubscriberExt;
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
            .with(InterruptedReplies);
        tracing::subscriber::with_default(subscriber, emit);
        let text = out.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    /// The same through the `log` crate, which fuser logs with, as the processes
    /// bridge it (the log.target field names fuser).
    #[test]
    fn interrupted_replies_through_the_log_crate_are_not_logged() {
        use tracing_subscriber::util::SubscriberInitExt;
        // Installs the log-to-tracing bridge, as `init` does.
        let _ = tracing_subscriber::registry().try_init();
        let text = logged_without_interrupted_replies(|| {
            let enoent = std::io::Error::from_raw_os_error(2);
            let einval = std::io::Error::from_raw_os_error(22);
            log::error!(target: "fuser::reply", "Failed to send FUSE reply: {enoent}");
            log::error!(target: "fuser::reply", "Failed to send FUSE reply: {einval}");
        });
        assert!(!text.contains("(os error 2)"), "{text}");
        assert!(text.contains("(os error 22)"), "{text}");
    }

    /// fuser's failed reply to a request the kernel dropped is left out; its other
    /// failed replies, and the same words from anywhere else, are kept.
    #[test]
    fn interrupted_replies_are_not_logged() {
        let text = logged_without_interrupted_replies(|| {
            tracing::error!(
                target: "fuser::reply",
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
            tracing::error!(
                target: "fuser::reply",
                "Failed to send FUSE reply: Invalid argument (os error 22)"
            );
            tracing::error!(target: "stargzd::other", "No such file or directory");
        });
        assert!(!text.contains("(os error 2)"), "{text}");
        assert!(text.contains("Invalid argument"), "{text}");
        assert!(text.contains("stargzd::other"), "{text}");
    }

    fn args(v: &[&str]) -> Vec<String> {
        go_style_args(
            v.iter().map(OsString::from),
            &["address", "config", "log-level", "root", "version"],
        )
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect()
    }

    #[test]
    fn single_dash_long_flags() {
        assert_eq!(
            args(&[
                "prog",
                "-address",
                "/run/x.sock",
                "-log-level=debug",
                "--root",
                "/r",
                "-version",
                "-x",
                "--",
                "-config",
            ]),
            [
                "prog",
                "--address",
                "/run/x.sock",
                "--log-level=debug",
                "--root",
                "/r",
                "--version",
                "-x",
                "--",
                "-config",
            ]
        );
        // A value that looks like a flag stays a value only after `=`.
        assert_eq!(args(&["prog", "-config=-root"]), ["prog", "--config=-root"]);
    }

    #[test]
    fn reference_level_names() {
        for l in [
            "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic", "INFO",
        ] {
            assert!(level_filter(l).is_ok(), "{l}");
        }
        assert_eq!(level_filter("fatal").unwrap().to_string(), "error");
        assert_eq!(level_filter("warning").unwrap().to_string(), "warn");
        assert!(level_filter("stargzd=debug,info").is_ok());
        let e = format!("{:#}", level_filter("loud=[").unwrap_err());
        assert!(e.contains("fatal"), "{e}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(
            rfc3339(1_767_225_599, 999_999_999),
            "2025-12-31T23:59:59.999999999Z"
        );
    }
}
