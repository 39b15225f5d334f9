//! The node's TOML configuration.
//!
//! ```toml
//! name = "kitchen-pi"              # default: the host name
//! anchor = "anchor.example:7444"   # default: the anchors saved in the state directory
//! anchors = ["a2.example:7444"]    # more anchors of the cluster, tried after `anchor`
//! max_concurrent_invocations = 16
//! reconnect_max = "30s"
//!
//! [desktop]
//! open_url = false                 # enables desktop.open_url (http/https only)
//!
//! [capabilities.backup]
//! command = ["/usr/local/bin/backup", "--json"]
//! timeout = "60s"
//! max_output = 65536
//! description = "Run a backup now"
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use anchorage_mesh::config::parse_duration;

use crate::anchors::{self, AnchorAddr};
use crate::capability::CommandSpec;

pub use anchorage_mesh::config::ConfigError;

/// Desktop integration switches.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DesktopConfig {
    /// Offer `desktop.open_url`.
    #[serde(default)]
    pub open_url: bool,
}

/// The peer mesh (`[mesh]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Try direct paths to peers (default). `false`: every peer packet goes through the
    /// anchor's relay and no probe is sent or answered, so peers never learn this node's
    /// addresses.
    #[serde(default = "yes")]
    pub direct: bool,
}

fn yes() -> bool {
    true
}

impl Default for MeshConfig {
    fn default() -> MeshConfig {
        MeshConfig { direct: true }
    }
}

/// The node's configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Device name to register with.
    pub name: Option<String>,
    /// Anchor address (`HOST:PORT`, or a comma-separated list) to dial instead of those saved
    /// in the state directory.
    pub anchor: Option<String>,
    /// More anchor addresses, dialed after `anchor`. Like `anchor`, they stay in the rotation
    /// whatever the anchors say.
    #[serde(default)]
    pub anchors: Vec<String>,
    /// Invocations run at once.
    pub max_concurrent_invocations: Option<usize>,
    /// Longest pause between reconnection attempts.
    pub reconnect_max: Option<String>,
    /// Desktop integration.
    #[serde(default)]
    pub desktop: DesktopConfig,
    /// The peer mesh.
    #[serde(default)]
    pub mesh: MeshConfig,
    /// Operator-defined command capabilities.
    #[serde(default)]
    pub capabilities: BTreeMap<String, CommandSpec>,
}

impl NodeConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let config: NodeConfig = anchorage_mesh::config::read_toml(path)?;
        config.check()?;
        Ok(config)
    }

    /// Checks values that TOML types alone do not.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(0) = self.max_concurrent_invocations {
            return Err(ConfigError::Invalid {
                key: "max_concurrent_invocations".into(),
                message: "must be at least 1".into(),
            });
        }
        self.reconnect_max()?;
        self.anchor_addrs()?;
        for (name, spec) in &self.capabilities {
            crate::capability::CommandCap::new(name.clone(), spec.clone()).map_err(|message| {
                ConfigError::Invalid {
                    key: format!("capabilities.{name}"),
                    message,
                }
            })?;
            if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_whitespace()) {
                return Err(ConfigError::Invalid {
                    key: format!("capabilities.{name}"),
                    message: "capability names are 1-128 characters without spaces".into(),
                });
            }
        }
        Ok(())
    }

    /// The configured anchors, `anchor` first, without duplicates; empty when none is set.
    pub fn anchor_addrs(&self) -> Result<Vec<AnchorAddr>, ConfigError> {
        let key = if self.anchors.is_empty() {
            "anchor"
        } else {
            "anchors"
        };
        anchors::parse_list(self.anchor.iter().chain(self.anchors.iter()))
            .map_err(|e| ConfigError::invalid(key, e.to_string()))
    }

    /// The reconnect cap (default 30 s).
    pub fn reconnect_max(&self) -> Result<Duration, ConfigError> {
        match &self.reconnect_max {
            None => Ok(Duration::from_secs(30)),
            Some(s) => {
                parse_duration(s).map_err(|e| ConfigError::invalid("reconnect_max", e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c: NodeConfig = toml::from_str(
            r#"
            name = "kitchen-pi"
            max_concurrent_invocations = 4
            [desktop]
            open_url = true
            [capabilities.backup]
            command = ["/bin/true"]
            timeout = "60s"
            "#,
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!(c.name.as_deref(), Some("kitchen-pi"));
        assert!(c.desktop.open_url);
        assert_eq!(c.capabilities["backup"].command, vec!["/bin/true"]);
    }

    #[test]
    fn bad_configs_are_refused_with_the_key() {
        let c: NodeConfig = toml::from_str("[capabilities.x]\ncommand = []").unwrap();
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .contains("capabilities.x")
        );
        let c: NodeConfig =
            toml::from_str("[capabilities.x]\ncommand = [\"a\"]\ntimeout = \"soon\"").unwrap();
        assert!(c.check().is_err());
        assert!(toml::from_str::<NodeConfig>("nmae = \"x\"").is_err());
    }

    #[test]
    fn anchors_come_from_anchor_then_anchors() {
        let c: NodeConfig = toml::from_str(
            r#"
            anchor = "a.example:7444"
            anchors = ["b.example:7444", "c.example:7444,a.example:7444"]
            "#,
        )
        .unwrap();
        c.check().unwrap();
        let names: Vec<String> = c
            .anchor_addrs()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            ["a.example:7444", "b.example:7444", "c.example:7444"]
        );
        assert!(NodeConfig::default().anchor_addrs().unwrap().is_empty());
        let c: NodeConfig = toml::from_str("anchors = [\"b.example\"]").unwrap();
        let err = c.check().unwrap_err().to_string();
        assert!(
            err.contains("anchors") && err.contains("HOST:PORT"),
            "{err}"
        );
        let many: Vec<String> = (1..=65).map(|p| format!("\"a:{p}\"")).collect();
        let c: NodeConfig = toml::from_str(&format!("anchors = [{}]", many.join(","))).unwrap();
        assert!(c.check().is_err(), "more than the wire allows");
    }
}
