//! JSON-lines logging to a file. Every line written while serving a request
//! carries the request's span, and so its `op_id`.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Install the global subscriber: JSON lines appended to `log_file`, filtered
/// by `RUST_LOG` when set, else by `default_filter`; with `human_stderr`, also
/// a readable copy on stderr.
pub fn init(log_file: &Path, default_filter: &str, human_stderr: bool) -> anyhow::Result<()> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)?;
    let filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(default_filter))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let json = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(Mutex::new(file))
        .with_filter(filter());
    let human = human_stderr.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(json)
        .with(human)
        .try_init()?;
    Ok(())
}

use tracing_subscriber::Layer as _;
