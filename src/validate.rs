//! Validate: the envelope and payload are checked against the schema for their (type, version),
//! and fields that only the gateway may set are refused. Schemas are read from the local
//! `schemas/` folder and compiled once at start-up; references never leave that folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::decode::Pointer;
use crate::envelope::{Node, Tree};
use crate::identifiers::{
    CH_AHVN13_FORMAT, IT_CF_FORMAT, is_valid_ahv_number, is_valid_codice_fiscale,
};
use crate::rejection::{Code, FieldError, Rejection};

/// Base URI the schema files are known under while compiling. Relative `$ref`s between files
/// resolve against it and are served from memory; nothing is fetched.
const BASE_URI: &str = "file:///ponte-schemas/";

/// Message types that only the gateway produces; partners may not send them.
pub const GATEWAY_TYPES: &[&str] = &["receipt"];

/// One compiled schema for a (type, version).
pub struct TypeSchema {
    validator: jsonschema::Validator<Tree>,
    /// The version it validates (`MAJOR.MINOR`): a message it passed has this `version`.
    pub version: String,
    /// JSON pointers of properties marked `"readOnly": true`: the gateway fills them in on
    /// delivery and refuses them from senders.
    pub gateway_owned: Vec<Pointer>,
    /// Every property the schema itself declares, by instance pointer, with its allowed string
    /// values when it is an enum: what code tables and field lists are checked against.
    pub fields: BTreeMap<String, Option<Vec<String>>>,
    /// Pointer of the property marked `"x-case-reference": true`: the sender's own reference
    /// for the case, which the case crosswalk links across partners.
    pub case_reference: Option<Pointer>,
    pub file: PathBuf,
}

impl std::fmt::Debug for TypeSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypeSchema")
            .field("gateway_owned", &self.gateway_owned)
            .field("file", &self.file)
            .finish()
    }
}

/// Every message type and version the gateway knows: `schemas/<type>/<MAJOR.MINOR>.json`. Files
/// directly in `schemas/` hold shared definitions.
#[derive(Debug, Default)]
pub struct SchemaSet {
    types: BTreeMap<String, BTreeMap<String, TypeSchema>>,
}

/// A schema problem found at start-up, with its file.
#[derive(Debug)]
pub struct SchemaError {
    pub file: PathBuf,
    pub message: String,
}

impl SchemaSet {
    /// Reads and compiles every schema under `dir`, collecting every error instead of stopping
    /// at the first.
    pub fn load(dir: &Path) -> (SchemaSet, Vec<SchemaError>) {
        let mut errors = Vec::new();
        let mut documents: HashMap<String, Value> = HashMap::new();
        let mut type_files: Vec<(String, String, PathBuf, String)> = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(SchemaError {
                    file: dir.to_path_buf(),
                    message: format!("cannot read the schema folder: {e}"),
                });
                return (SchemaSet::default(), errors);
            }
        };
        let mut read = |path: &Path, rel: String, errors: &mut Vec<SchemaError>| -> bool {
            match std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
            {
                Ok(doc) => {
                    documents.insert(format!("{BASE_URI}{rel}"), doc);
                    true
                }
                Err(e) => {
                    errors.push(SchemaError {
                        file: path.to_path_buf(),
                        message: format!("not a JSON schema: {e}"),
                    });
                    false
                }
            }
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if path.is_dir() {
                let mut versions: Vec<PathBuf> = std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .collect();
                versions.sort();
                for file in versions {
                    let file_name = file
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string();
                    let Some(version) = file_name.strip_suffix(".json") else {
                        continue;
                    };
                    if !is_version(version) {
                        errors.push(SchemaError {
                            file: file.clone(),
                            message: "schema files of a type are named MAJOR.MINOR.json".into(),
                        });
                        continue;
                    }
                    let rel = format!("{name}/{file_name}");
                    if read(&file, rel.clone(), &mut errors) {
                        type_files.push((name.clone(), version.to_string(), file.clone(), rel));
                    }
                }
            } else if name.ends_with(".json") {
                read(&path, name.clone(), &mut errors);
            }
        }
        let documents = Arc::new(documents);
        let mut set = SchemaSet::default();
        for (type_name, version, file, rel) in type_files {
            let uri = format!("{BASE_URI}{rel}");
            let schema = &documents[&uri];
            let compiled = jsonschema::options_for::<Tree>()
                .with_draft(jsonschema::Draft::Draft202012)
                .with_base_uri(uri.clone())
                .with_retriever(LocalSchemas(documents.clone()))
                .with_format(IT_CF_FORMAT, is_valid_codice_fiscale)
                .with_format(CH_AHVN13_FORMAT, is_valid_ahv_number)
                .should_validate_formats(true)
                .build(schema);
            match compiled {
                Ok(validator) => {
                    let mut fields = BTreeMap::new();
                    collect_fields(schema, "", &mut fields);
                    let annotated = |keyword: &str| {
                        fields
                            .keys()
                            .filter(|p| {
                                schema
                                    .pointer(&schema_pointer(p))
                                    .and_then(|s| s.get(keyword))
                                    == Some(&Value::Bool(true))
                            })
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    let gateway_owned = annotated("readOnly");
                    let mut references = annotated("x-case-reference");
                    if references.len() > 1 {
                        errors.push(SchemaError {
                            file: file.clone(),
                            message: format!(
                                "only one property may be the case reference (x-case-reference), found {}",
                                references.join(", ")
                            ),
                        });
                    }
                    set.types.entry(type_name).or_default().insert(
                        version.clone(),
                        TypeSchema {
                            validator,
                            version,
                            gateway_owned: gateway_owned.into_iter().map(Pointer::from).collect(),
                            fields,
                            case_reference: references.pop().map(Pointer::from),
                            file,
                        },
                    );
                }
                Err(e) => errors.push(SchemaError {
                    file,
                    message: format!("does not compile: {e}"),
                }),
            }
        }
        (set, errors)
    }

    pub fn has_type(&self, type_name: &str) -> bool {
        self.types.contains_key(type_name)
    }

    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    pub fn get(&self, type_name: &str, version: &str) -> Option<&TypeSchema> {
        self.types.get(type_name)?.get(version)
    }

    /// Checks a decoded envelope: known type, supported version, schema, no gateway-owned fields.
    pub fn validate(&self, envelope: &Node) -> Result<&TypeSchema, Rejection> {
        let type_name = required_string(envelope, "type")?;
        let Some(versions) = self.types.get(type_name) else {
            return Err(Rejection::one(
                Code::UnknownType,
                FieldError::new(
                    "/type",
                    "enum",
                    format!(
                        "unknown message type {type_name:?}; known types: {}",
                        self.type_list()
                    ),
                ),
            ));
        };
        let version = required_string(envelope, "version")?;
        let Some(schema) = versions.get(version) else {
            let supported: Vec<&str> = versions.keys().map(String::as_str).collect();
            return Err(Rejection::one(
                Code::UnsupportedVersion,
                FieldError::new(
                    "/version",
                    "enum",
                    format!(
                        "version {version:?} of {type_name} is not supported; supported: {}",
                        supported.join(", ")
                    ),
                ),
            ));
        };
        // Most messages are valid: the plain check is cheaper than collecting errors.
        if !schema.validator.is_valid(envelope) {
            let errors: Vec<FieldError> = schema
                .validator
                .iter_errors(envelope)
                .take(Rejection::MAX_ERRORS)
                .map(|e| {
                    FieldError::new(
                        e.instance_path().as_str(),
                        e.kind().keyword(),
                        e.masked().to_string(),
                    )
                })
                .collect();
            return Err(Rejection::new(Code::SchemaViolation, errors));
        }
        let owned: Vec<FieldError> = schema
            .gateway_owned
            .iter()
            .filter(|p| p.get(envelope).is_some())
            .map(|p| {
                FieldError::new(
                    p.as_str(),
                    "readOnly",
                    "this field is set by the gateway on delivery; a sender must not set it",
                )
            })
            .collect();
        if !owned.is_empty() {
            return Err(Rejection::new(Code::SchemaViolation, owned));
        }
        Ok(schema)
    }

    /// Validates a message the gateway itself produced (receipts); used by tests and `ponte check`.
    pub fn is_valid(&self, type_name: &str, version: &str, message: &Value) -> bool {
        self.get(type_name, version)
            .is_some_and(|s| s.validator.is_valid(&Node::from(message)))
    }

    /// Every version of `type_name`.
    pub fn versions(&self, type_name: &str) -> impl Iterator<Item = (&str, &TypeSchema)> {
        self.types
            .get(type_name)
            .into_iter()
            .flatten()
            .map(|(v, s)| (v.as_str(), s))
    }

    /// Whether some version of `type_name` declares the property at `pointer`; with the union
    /// of its enum values over the versions when it is an enum in all of them.
    pub fn field(&self, type_name: &str, pointer: &str) -> Option<Option<Vec<String>>> {
        let mut found: Option<Option<Vec<String>>> = None;
        for (_, schema) in self.versions(type_name) {
            if let Some(values) = schema.fields.get(pointer) {
                found = Some(match (found, values) {
                    (None, v) => v.clone(),
                    (Some(Some(mut a)), Some(b)) => {
                        let new: Vec<String> =
                            b.iter().filter(|x| !a.contains(x)).cloned().collect();
                        a.extend(new);
                        Some(a)
                    }
                    _ => None,
                });
            }
        }
        found
    }

    fn type_list(&self) -> String {
        self.types
            .keys()
            .filter(|t| !GATEWAY_TYPES.contains(&t.as_str()))
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn required_string<'a>(envelope: &'a Node, field: &str) -> Result<&'a str, Rejection> {
    match envelope.get(field) {
        Some(Node::String(s)) => Ok(s),
        Some(_) => Err(Rejection::one(
            Code::SchemaViolation,
            FieldError::new(
                format!("/{field}"),
                "type",
                format!("{field} must be a string"),
            ),
        )),
        None => Err(Rejection::one(
            Code::SchemaViolation,
            FieldError::new("", "required", format!("{field:?} is a required property")),
        )),
    }
}

fn is_version(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Walks the schema's own `properties` (not through `$ref`) and records the instance pointer of
/// every property, with its string values when it is an enum.
fn collect_fields(schema: &Value, prefix: &str, out: &mut BTreeMap<String, Option<Vec<String>>>) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, sub) in properties {
        let pointer = format!("{prefix}/{}", name.replace('~', "~0").replace('/', "~1"));
        let values = sub.get("enum").and_then(Value::as_array).map(|values| {
            values
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        });
        out.insert(pointer.clone(), values);
        collect_fields(sub, &pointer, out);
    }
}

/// The pointer into the schema document of the property at instance pointer `instance`
/// (`/payload/reason` → `/properties/payload/properties/reason`).
fn schema_pointer(instance: &str) -> String {
    instance
        .split('/')
        .skip(1)
        .map(|part| format!("/properties/{part}"))
        .collect()
}

/// Serves `$ref` targets from the schema files already read; refuses everything else, so a
/// schema can never make the gateway reach the network.
struct LocalSchemas(Arc<HashMap<String, Value>>);

impl jsonschema::Retrieve for LocalSchemas {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let key = uri.as_str().split('#').next().unwrap_or_default();
        self.0
            .get(key)
            .cloned()
            .ok_or_else(|| format!("{key} is not a file in the schema folder").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schemas() -> SchemaSet {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let (set, errors) = SchemaSet::load(&dir);
        assert!(errors.is_empty(), "{errors:?}");
        set
    }

    fn referral() -> Value {
        json!({
            "message_id": "6f1c2a9e-8a4b-4c1e-9b7a-3d2f1e0c9b8a",
            "type": "referral",
            "version": "1.0",
            "sender": "cpi-modena",
            "sent_at": "2026-11-23T09:15:00+01:00",
            "subject": {"identifiers": [{"scheme": "it.cf", "value": "RSSMRA85T10A562S"}]},
            "payload": {
                "referral_id": "MO-2026-0001",
                "reason": "did-registered",
                "office": "CPI-MO-01",
                "municipality": "036023",
                "legal_basis": "D.Lgs. 150/2015 art. 19",
                "consent": {"given": true}
            }
        })
    }

    fn rejection(message: &Value) -> Rejection {
        schemas().validate(&Node::from(message)).unwrap_err()
    }

    #[test]
    fn valid_referral_passes() {
        schemas().validate(&Node::from(&referral())).unwrap();
    }

    #[test]
    fn wrong_check_character_points_at_the_identifier_value() {
        let mut m = referral();
        m["subject"]["identifiers"][0]["value"] = json!("RSSMRA85T10A562T");
        let r = rejection(&m);
        assert_eq!(r.code, Code::SchemaViolation);
        assert_eq!(r.errors[0].path, "/subject/identifiers/0/value");
        assert_eq!(r.errors[0].keyword, "format");
        assert!(
            !r.errors[0].message.contains("RSSMRA"),
            "value leaked: {}",
            r.errors[0].message
        );
    }

    #[test]
    fn ahv_number_is_checked_too() {
        let mut m = referral();
        m["subject"]["identifiers"] = json!([{"scheme": "ch.ahvn13", "value": "756.1234.5678.98"}]);
        assert_eq!(rejection(&m).errors[0].path, "/subject/identifiers/0/value");
        m["subject"]["identifiers"] = json!([{"scheme": "ch.ahvn13", "value": "756.1234.5678.97"}]);
        schemas().validate(&Node::from(&m)).unwrap();
    }

    #[test]
    fn every_violation_is_listed() {
        let mut m = referral();
        m["payload"]["reason"] = json!("because");
        m["payload"]["municipality"] = json!("36023");
        m["unexpected"] = json!(1);
        let r = rejection(&m);
        let mut found: Vec<(String, String)> = r
            .errors
            .iter()
            .map(|e| (e.path.clone(), e.keyword.clone()))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                ("".into(), "additionalProperties".into()),
                ("/payload/municipality".into(), "pattern".into()),
                ("/payload/reason".into(), "enum".into()),
            ]
        );
    }

    #[test]
    fn unknown_type_and_unsupported_version_have_their_own_codes() {
        let mut m = referral();
        m["type"] = json!("pension-claim");
        assert_eq!(rejection(&m).code, Code::UnknownType);
        let mut m = referral();
        m["version"] = json!("2.0");
        let r = rejection(&m);
        assert_eq!(r.code, Code::UnsupportedVersion);
        assert!(r.errors[0].message.contains("1.0"));
    }

    #[test]
    fn gateway_owned_field_is_refused() {
        let mut m = referral();
        m["payload"]["sender_office"] = json!("CPI-MO-01");
        let r = rejection(&m);
        assert_eq!(r.code, Code::SchemaViolation);
        assert_eq!(r.errors[0].path, "/payload/sender_office");
        assert_eq!(r.errors[0].keyword, "readOnly");
    }

    #[test]
    fn date_time_needs_an_offset() {
        let mut m = referral();
        m["sent_at"] = json!("2026-11-23T09:15:00");
        assert_eq!(rejection(&m).errors[0].path, "/sent_at");
    }

    #[test]
    fn a_ref_outside_the_folder_is_a_load_error() {
        let dir = std::env::temp_dir().join(format!("ponte-schema-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("t")).unwrap();
        std::fs::write(
            dir.join("t/1.0.json"),
            r#"{"$ref": "https://example.org/remote.json"}"#,
        )
        .unwrap();
        let (_, errors) = SchemaSet::load(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].file.ends_with("t/1.0.json"));
    }
}
