//! The library's error type: every failure says which file or input it concerns and what to do.

use std::path::PathBuf;

/// Errors raised by the afinar library. The CLI prints them as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model source could not be found or resolved.
    #[error("{0}")]
    ModelSource(String),

    /// A file exists but its content is not what it should be.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },

    /// The model's architecture is not one afinar implements.
    #[error("{path}: unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },

    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),

    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A command-line flag or request field is out of range or inconsistent.
    #[error("{0}")]
    InvalidArgument(String),

    /// A training config (TOML file or `--set` override) is wrong: unknown key, bad value.
    #[error("{0}")]
    Config(String),

    /// A dataset cannot be used as given: no data, an empty split, a record refused by --strict.
    #[error("{0}")]
    Data(String),

    /// A run directory cannot be resumed (no checkpoint, different configuration or model).
    #[error("{0}")]
    Resume(String),

    /// Training went wrong at run time: a non-finite loss, a parameter without a gradient.
    #[error("{0}")]
    Training(String),

    /// The HTTP server could not start or stopped with an error.
    #[error("{0}")]
    Server(String),

    /// Something afinar does not do (yet), said with what to use instead.
    #[error("{0}")]
    Unsupported(String),

    /// A value could not be written as JSON.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),

    /// A tensor operation failed.
    #[error("{}", candle_message(.0))]
    Candle(candle_core::Error),

    /// An I/O error with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for a [`Error::BadFile`].
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for an [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set, so errors
/// stay one line.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
