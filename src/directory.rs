//! Directory: all configuration, loaded and checked once in two phases (each file on its own,
//! then the files against each other), collecting every error with its file before refusing.
//! The result is immutable and shared by reference with every flow, except the code tables,
//! which a reload swaps as a whole.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::authorize::Matrix;
use crate::partner::Partner;
use crate::route::{Route, load_routes};
use crate::settings::{MAIN_FILE, Settings};
use crate::tables::Tables;
use crate::validate::SchemaSet;

/// Everything the gateway is configured with.
#[derive(Debug)]
pub struct Directory {
    pub settings: Settings,
    pub schemas: SchemaSet,
    /// By partner id, in a stable order (logs, topology, `ponte check` output).
    pub partners: BTreeMap<String, Partner>,
    pub routes: Vec<Route>,
    pub matrix: Matrix,
    /// The code tables in force; [`Directory::reload_tables`] replaces them.
    pub tables: ArcSwap<Tables>,
    pub config_dir: PathBuf,
    /// The broker's TLS authorities and Ponte's client certificate, when configured.
    pub broker_tls: crate::broker::BrokerTls,
}

/// One configuration mistake and the file it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub message: String,
}

/// Every mistake found; `ponte check` prints them all, `ponte run` refuses to start on any.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{}: {}", e.file.display(), e.message)?;
        }
        write!(
            f,
            "{} configuration error{}",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for ConfigErrors {}

impl Directory {
    /// Loads `<dir>/ponte.toml`, the schemas, every partner file and the routes.
    pub fn load(dir: &Path) -> Result<Directory, ConfigErrors> {
        Self::load_with_overrides(dir, &[])
    }

    /// As [`Directory::load`], but without reading partners' keys from the environment: for the
    /// tools that talk to the broker as a partner or an operator (`send`, `receive`, `rejected`,
    /// `definitions`, `crosswalk`), which never map a message. Such a directory cannot run the
    /// gateway ([`crate::pipeline::Pipeline::new`] refuses it).
    pub fn load_without_secrets(dir: &Path) -> Result<Directory, ConfigErrors> {
        Self::load_with(dir, &[], false)
    }

    /// As [`Directory::load`], with settings overridden by dotted key (`broker.prefix`).
    pub fn load_with_overrides(
        dir: &Path,
        overrides: &[(&str, &str)],
    ) -> Result<Directory, ConfigErrors> {
        Self::load_with(dir, overrides, true)
    }

    fn load_with(
        dir: &Path,
        overrides: &[(&str, &str)],
        secrets: bool,
    ) -> Result<Directory, ConfigErrors> {
        let mut errors = Vec::new();
        let mut push = |file: &Path, message: String| {
            errors.push(ConfigError {
                file: file.to_path_buf(),
                message,
            })
        };
        let main_file = dir.join(MAIN_FILE);
        let settings = match Settings::load(dir, overrides) {
            Ok(s) => s,
            Err(messages) => {
                for m in messages {
                    push(&main_file, m);
                }
                // Check the rest anyway, so that one run reports as much as it can.
                Settings {
                    paths: Settings::paths_only(dir),
                    ..Default::default()
                }
            }
        };
        let broker_tls =
            crate::broker::BrokerTls::load(&settings.broker, dir).unwrap_or_else(|m| {
                for m in m {
                    push(&main_file, m);
                }
                Default::default()
            });
        let schema_dir = dir.join(&settings.paths.schemas);
        let (schemas, schema_errors) = SchemaSet::load(&schema_dir);
        for e in schema_errors {
            push(&e.file, e.message);
        }
        let env = |name: &str| std::env::var(name).ok();
        let env: Option<crate::partner::EnvLookup<'_>> = if secrets { Some(&env) } else { None };

        let partner_dir = dir.join(&settings.paths.partners);
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&partner_dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) => {
                push(&partner_dir, format!("cannot read the partner folder: {e}"));
                Vec::new()
            }
        };
        files.sort();
        let mut partners = BTreeMap::new();
        for file in &files {
            match Partner::load(file, &schemas, env) {
                Ok(p) => {
                    partners.insert(p.id.clone(), p);
                }
                Err(messages) => {
                    for m in messages {
                        push(file, m);
                    }
                }
            }
        }
        if files.is_empty() {
            push(&partner_dir, "no partner files (*.toml) found".into());
        }
        let reserved: u32 = partners
            .values()
            .filter_map(|p| p.prefetch)
            .map(u32::from)
            .sum();
        if reserved > settings.broker.max_in_flight {
            push(
                &partner_dir,
                format!(
                    "the partners' own prefetch add up to {reserved}, more than broker.max_in_flight ({})",
                    settings.broker.max_in_flight
                ),
            );
        }

        let matrix_file = dir.join(&settings.paths.authorization);
        let matrix = match std::fs::read_to_string(&matrix_file) {
            Ok(text) => {
                let (matrix, messages) = Matrix::load(&text, &partners, &schemas);
                for m in messages {
                    push(&matrix_file, m);
                }
                matrix
            }
            Err(e) => {
                push(&matrix_file, format!("cannot read: {e}"));
                Matrix::default()
            }
        };

        let routes_file = dir.join(&settings.paths.routes);
        let routes = match std::fs::read_to_string(&routes_file) {
            Ok(text) => load_routes(&text, &partners, &matrix).unwrap_or_else(|messages| {
                for m in messages {
                    push(&routes_file, m);
                }
                Vec::new()
            }),
            Err(e) => {
                push(&routes_file, format!("cannot read: {e}"));
                Vec::new()
            }
        };

        let tables = Tables::load(&dir.join(&settings.paths.tables), &partners, &schemas)
            .unwrap_or_else(|table_errors| {
                errors.extend(table_errors);
                Tables::default()
            });

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Directory {
            settings,
            schemas,
            partners,
            routes,
            matrix,
            tables: ArcSwap::from_pointee(tables),
            config_dir: dir.to_path_buf(),
            broker_tls,
        })
    }

    /// Reads the code tables again and puts them in force if they are valid; otherwise keeps
    /// the tables in force and returns every error. Messages being mapped finish with the
    /// tables they started with.
    pub fn reload_tables(&self) -> Result<Arc<Tables>, ConfigErrors> {
        let dir = self.config_dir.join(&self.settings.paths.tables);
        let tables =
            Arc::new(Tables::load(&dir, &self.partners, &self.schemas).map_err(ConfigErrors)?);
        self.tables.store(tables.clone());
        Ok(tables)
    }
}
