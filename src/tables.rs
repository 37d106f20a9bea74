//! Code tables: the CSV files under `config/tables/` that say, per partner, which of its offices
//! is competent for which municipality (`offices.csv`) and which of its own codes it uses for a
//! shared code (`codes.csv`). Checked at start-up against the partners and the schemas, and
//! reloaded on SIGHUP: a message is mapped with one snapshot of the tables from start to end, and
//! a reload whose tables are wrong keeps the previous ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ConfigMap;
use crate::decode::Pointer;
use crate::directory::ConfigError;
use crate::partner::Partner;
use crate::validate::SchemaSet;

/// The file holding each partner's offices and the municipalities they are competent for.
pub const OFFICES_FILE: &str = "offices.csv";
/// The file holding the partners' own codes for shared codes.
pub const CODES_FILE: &str = "codes.csv";

/// The partners' own codes for one message type: pointer → shared code → the partner's code.
pub type CodeMap = BTreeMap<Pointer, ConfigMap<String, String>>;

/// One consistent set of code tables.
#[derive(Debug, Default)]
pub struct Tables {
    /// partner → municipality → the partner's office competent for it.
    offices: ConfigMap<String, ConfigMap<String, String>>,
    /// kind → municipality → the one partner of that kind competent for it.
    competence: ConfigMap<String, ConfigMap<String, String>>,
    /// partner → type → the partner's own codes.
    codes: ConfigMap<String, ConfigMap<String, CodeMap>>,
    /// Rows loaded, for the log line of a reload.
    pub office_rows: usize,
    pub code_rows: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfficeRow {
    partner: String,
    office: String,
    municipality: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeRow {
    partner: String,
    #[serde(rename = "type")]
    message_type: String,
    field: String,
    code: String,
    local: String,
}

impl Tables {
    /// The office of `partner` competent for `municipality`.
    pub fn office_for(&self, partner: &str, municipality: &str) -> Option<&str> {
        self.offices
            .get(partner)?
            .get(municipality)
            .map(String::as_str)
    }

    /// Whether `partner` has offices at all (a partner without, say a national body with one
    /// desk, keeps the sender's office code).
    pub fn has_offices(&self, partner: &str) -> bool {
        self.offices.contains_key(partner)
    }

    /// The partner of `kind` competent for `municipality`.
    pub fn competent(&self, kind: &str, municipality: &str) -> Option<&str> {
        self.competence
            .get(kind)?
            .get(municipality)
            .map(String::as_str)
    }

    /// The municipalities some partner is competent for, with that partner's office.
    pub fn offices_of(&self, partner: &str) -> impl Iterator<Item = (&str, &str)> {
        self.offices
            .get(partner)
            .into_iter()
            .flatten()
            .map(|(m, o)| (m.as_str(), o.as_str()))
    }

    /// `partner`'s own codes for messages of `message_type`.
    pub fn codes(&self, partner: &str, message_type: &str) -> Option<&CodeMap> {
        self.codes.get(partner)?.get(message_type)
    }

    /// Reads and checks every table in `dir`. A missing file is an empty table; any other file
    /// in the folder is an error, so a misspelt name does not go unnoticed.
    pub fn load(
        dir: &Path,
        partners: &BTreeMap<String, Partner>,
        schemas: &SchemaSet,
    ) -> Result<Tables, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut tables = Tables::default();
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().to_string();
                    if name != OFFICES_FILE && name != CODES_FILE && !name.starts_with('.') {
                        errors.push(ConfigError {
                            file: entry.path(),
                            message: format!(
                                "not a known code table (known: {OFFICES_FILE}, {CODES_FILE})"
                            ),
                        });
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(ConfigError {
                file: dir.to_path_buf(),
                message: format!("cannot read the tables folder: {e}"),
            }),
        }
        let file = dir.join(OFFICES_FILE);
        let mut push = |message: String| {
            errors.push(ConfigError {
                file: file.clone(),
                message,
            })
        };
        for (line, row) in read_rows::<OfficeRow>(&file, &mut push) {
            let at = format!("line {line}");
            let Some(partner) = partners.get(&row.partner) else {
                push(format!("{at}: unknown partner {:?}", row.partner));
                continue;
            };
            if !is_office_code(&row.office) {
                push(format!("{at}: {:?} is not a valid office code", row.office));
            }
            if row.municipality.len() != 6 || !row.municipality.bytes().all(|b| b.is_ascii_digit())
            {
                push(format!(
                    "{at}: {:?} is not a six-digit ISTAT municipality code",
                    row.municipality
                ));
                continue;
            }
            let offices = tables.offices.entry(partner.id.clone()).or_default();
            if let Some(other) = offices.insert(row.municipality.clone(), row.office.clone()) {
                push(format!(
                    "{at}: municipality {} of {} is assigned to both {other} and {}",
                    row.municipality, partner.id, row.office
                ));
                continue;
            }
            // Competence must be unambiguous: one partner of a kind per municipality.
            let competent = tables.competence.entry(partner.kind.clone()).or_default();
            match competent.get(&row.municipality) {
                Some(other) if other != &partner.id => push(format!(
                    "{at}: municipality {} is already covered by {other}, also of kind {}; competence must be unambiguous",
                    row.municipality, partner.kind
                )),
                _ => {
                    competent.insert(row.municipality.clone(), partner.id.clone());
                }
            }
            tables.office_rows += 1;
        }

        let file = dir.join(CODES_FILE);
        let mut push = |message: String| {
            errors.push(ConfigError {
                file: file.clone(),
                message,
            })
        };
        for (line, row) in read_rows::<CodeRow>(&file, &mut push) {
            let at = format!("line {line}");
            if !partners.contains_key(&row.partner) {
                push(format!("{at}: unknown partner {:?}", row.partner));
                continue;
            }
            if !schemas.has_type(&row.message_type) {
                push(format!(
                    "{at}: no schema defines message type {:?}",
                    row.message_type
                ));
                continue;
            }
            match schemas.field(&row.message_type, &row.field) {
                None => {
                    push(format!(
                        "{at}: {} has no field {:?}",
                        row.message_type, row.field
                    ));
                    continue;
                }
                Some(None) => {
                    push(format!(
                        "{at}: {} {} is not a code list (no enum in its schema)",
                        row.message_type, row.field
                    ));
                    continue;
                }
                Some(Some(allowed)) if !allowed.contains(&row.code) => {
                    push(format!(
                        "{at}: {:?} is not a code the schema allows for {} {} (allowed: {})",
                        row.code,
                        row.message_type,
                        row.field,
                        allowed.join(", ")
                    ));
                    continue;
                }
                Some(Some(_)) => {}
            }
            if row.local.is_empty() || row.local.len() > 64 {
                push(format!(
                    "{at}: the partner's code must be 1 to 64 characters"
                ));
                continue;
            }
            let codes = tables
                .codes
                .entry(row.partner.clone())
                .or_default()
                .entry(row.message_type.clone())
                .or_default()
                .entry(Pointer::new(&row.field))
                .or_default();
            if let Some(other) = codes.get(&row.code) {
                push(format!(
                    "{at}: {} {} {} is listed twice (as {other:?} and {:?})",
                    row.partner, row.field, row.code, row.local
                ));
                continue;
            }
            if codes.values().any(|l| l == &row.local) {
                push(format!(
                    "{at}: {} code {:?} is used for two shared codes of {}",
                    row.partner, row.local, row.field
                ));
                continue;
            }
            codes.insert(row.code.clone(), row.local.clone());
            tables.code_rows += 1;
        }
        if errors.is_empty() {
            Ok(tables)
        } else {
            Err(errors)
        }
    }
}

/// The rows of a CSV file with a header line (`#` starts a comment line), each with its line
/// number; a missing file has none. Rows that do not parse are reported and skipped.
fn read_rows<T: serde::de::DeserializeOwned>(
    file: &PathBuf,
    push: &mut impl FnMut(String),
) -> Vec<(u64, T)> {
    let reader = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            push(format!("cannot read: {e}"));
            return Vec::new();
        }
    };
    let mut reader = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            push(format!("line 1: {e}"));
            return Vec::new();
        }
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        match record {
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                match record.deserialize::<T>(Some(&headers)) {
                    Ok(row) => rows.push((line, row)),
                    Err(e) => push(format!("line {line}: {e}")),
                }
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                push(format!("line {line}: {e}"));
            }
        }
    }
    rows
}

pub fn is_office_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Directory;

    fn demo() -> Directory {
        Directory::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap()
    }

    /// Loads tables written to a fresh folder; returns the tables or the error messages.
    fn load(offices: &str, codes: &str) -> Result<Tables, Vec<String>> {
        let d = demo();
        let dir = std::env::temp_dir().join(format!("ponte-tables-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(OFFICES_FILE), offices).unwrap();
        std::fs::write(dir.join(CODES_FILE), codes).unwrap();
        let result = Tables::load(&dir, &d.partners, &d.schemas)
            .map_err(|e| e.into_iter().map(|e| e.message).collect());
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    const OFFICES: &str =
        "partner,office,municipality\ninps,3600,036023\ncpi-modena,CPI-MO-01,036023\n";
    const CODES: &str =
        "partner,type,field,code,local\ninps,referral,/payload/reason,did-registered,R01\n";

    #[test]
    fn the_demo_tables_load() {
        let d = demo();
        let t = d.tables.load();
        assert_eq!(t.office_for("cpi-bologna", "037032"), Some("CPI-BO-02"));
        assert_eq!(t.competent("cpi", "036005"), Some("cpi-modena"));
        assert_eq!(t.competent("comune", "036005"), None);
        assert!(!t.has_offices("osservatorio-er"));
        let codes = t.codes("inps", "referral").unwrap();
        assert_eq!(
            codes[&Pointer::new("/payload/reason")]["pact-signed"],
            "R02"
        );
    }

    #[test]
    fn good_tables_load_with_comments_and_spaces() {
        let t = load(
            &format!("# offices\n{OFFICES}  cpi-modena , CPI-MO-02 , 036005\n"),
            CODES,
        )
        .unwrap();
        assert_eq!(t.office_for("cpi-modena", "036005"), Some("CPI-MO-02"));
        assert_eq!(t.office_rows, 3);
        assert_eq!(t.code_rows, 1);
    }

    #[test]
    fn every_office_mistake_is_reported_with_its_line() {
        let errors = load(
            "partner,office,municipality\n\
             inps,3600,036023\n\
             nobody,X-1,036023\n\
             inps,3700,036023\n\
             cpi-modena,CPI-MO-01,036023\n\
             cpi-bologna,CPI-BO-01,036023\n\
             cpi-modena,bad code!,36023\n",
            CODES,
        )
        .unwrap_err();
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(
            errors[0].starts_with("line 3: unknown partner"),
            "{errors:#?}"
        );
        assert!(errors[1].starts_with("line 4:") && errors[1].contains("both 3600 and 3700"));
        assert!(errors[2].starts_with("line 6:") && errors[2].contains("unambiguous"));
    }

    #[test]
    fn codes_must_be_codes_the_schema_allows_and_listed_once() {
        let errors = load(
            OFFICES,
            "partner,type,field,code,local\n\
             inps,referral,/payload/reason,did-registered,R01\n\
             inps,referral,/payload/reason,did-registered,R09\n\
             inps,referral,/payload/reason,pact-signed,R01\n\
             inps,referral,/payload/reason,holiday,R07\n\
             inps,referral,/payload/notes,x,y\n\
             inps,referral,/payload/colour,red,R\n\
             inps,pension,/payload/reason,x,y\n\
             nobody,referral,/payload/reason,pact-signed,R02\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 7, "{errors:#?}");
        assert!(errors[0].contains("listed twice"), "{errors:#?}");
        assert!(
            errors[1].contains("used for two shared codes"),
            "{errors:#?}"
        );
        assert!(
            errors[2].contains("not a code the schema allows"),
            "{errors:#?}"
        );
        assert!(errors[3].contains("not a code list"), "{errors:#?}");
    }

    #[test]
    fn a_wrong_header_or_an_unknown_table_file_is_an_error() {
        let errors = load("partner,office\ninps,3600\n", CODES).unwrap_err();
        assert!(errors[0].starts_with("line 2:"), "{errors:#?}");
        let d = demo();
        let dir = std::env::temp_dir().join(format!("ponte-tables-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ofices.csv"), OFFICES).unwrap();
        let errors = Tables::load(&dir, &d.partners, &d.schemas).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(errors[0].message.contains("not a known code table"));
    }
}
