//! What `anchord` and `anchor-node` share about their TOML configuration files: the error type
//! (both exit with code 64 on it), reading a file into a schema, and the duration grammar of
//! their settings and flags (the one `anchorctl` uses too).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use anchorage_wire::duration::{DurationError, parse_duration};

/// Errors in a configuration file or setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid setting `{key}`: {message}")]
    Invalid {
        /// The setting, as written in the file (`capabilities.NAME` for a table's entry).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// An invalid setting.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Reads a TOML file into `T` (unknown keys are refused where `T` says
/// `deny_unknown_fields`).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
