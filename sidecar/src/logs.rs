//! Log set-up for the binaries (the sidecar's and the operator's, which
//! calls it too): one format choice and one colour rule.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Where the logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Logs on `stream`, filtered by `RUST_LOG` (default `default_level`), as
/// text or, for `format` `json`, one JSON object per line. Text is coloured
/// only on a terminal with `NO_COLOR` unset or empty: a container's logs are
/// a file.
pub fn init(format: &str, default_level: &str, stream: Stream) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let (terminal, writer) = match stream {
        Stream::Stdout => (
            std::io::stdout().is_terminal(),
            BoxMakeWriter::new(std::io::stdout),
        ),
        Stream::Stderr => (
            std::io::stderr().is_terminal(),
            BoxMakeWriter::new(std::io::stderr),
        ),
    };
    let colour = terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
