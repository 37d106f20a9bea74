//! Route: who receives a message. Either the sender names the recipient, or the routing rules in
//! `config/routes.toml` choose: the first rule matching the type, the sender and the listed
//! payload values wins, and its targets are fixed partners or "the partner of kind X competent
//! for the message's municipality" (fan-out when a rule has several targets).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::authorize::{Conditions, Matrix, conditions, conditions_hold};
use crate::decode::Pointer;
use crate::directory::Directory;
use crate::envelope::Node;
use crate::partner::Partner;
use crate::rejection::{Code, FieldError, Rejection};
use crate::tables::Tables;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    route: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    name: String,
    #[serde(rename = "type")]
    message_type: String,
    from: Vec<String>,
    #[serde(default)]
    when: BTreeMap<String, Vec<String>>,
    #[serde(default = "default_municipality")]
    municipality: String,
    to: Vec<Target>,
}

fn default_municipality() -> String {
    "/payload/municipality".into()
}

/// Where a rule sends a message.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, untagged)]
pub enum Target {
    /// A fixed partner.
    Partner { partner: String },
    /// The partner of this kind competent for the message's municipality. Without
    /// `optional = true`, a message for a municipality no such partner covers is refused.
    Competent {
        competent: String,
        #[serde(default)]
        optional: bool,
    },
}

/// A checked routing rule.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub message_type: String,
    pub from: BTreeSet<String>,
    /// JSON pointer → accepted string values; all must hold.
    pub when: Conditions,
    /// JSON pointer of the municipality that decides competence.
    pub municipality: Pointer,
    pub to: Vec<Target>,
}

impl Route {
    fn matches(&self, message_type: &str, sender: &str, envelope: &Node) -> bool {
        self.message_type == message_type
            && self.from.contains(sender)
            && conditions_hold(&self.when, envelope)
    }
}

/// Reads `routes.toml` and checks it against the partners and the authorization matrix (a rule
/// whose messages the matrix would always refuse is a mistake); returns every problem found.
pub fn load_routes(
    text: &str,
    partners: &BTreeMap<String, Partner>,
    matrix: &Matrix,
) -> Result<Vec<Route>, Vec<String>> {
    let raw: RoutesFile = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut errors = Vec::new();
    let mut names = BTreeSet::new();
    let kinds: BTreeSet<&str> = partners.values().map(|p| p.kind.as_str()).collect();
    let mut routes = Vec::new();
    for r in raw.route {
        let at = format!("route {:?}", r.name);
        if !names.insert(r.name.clone()) {
            errors.push(format!("{at}: the name is used twice"));
        }
        for sender in &r.from {
            if !partners.contains_key(sender) {
                errors.push(format!("{at}: from: unknown partner {sender:?}"));
            } else if !matrix.may_send(sender, &r.message_type) {
                errors.push(format!(
                    "{at}: from: {sender} may not send {} (authorization.toml)",
                    r.message_type
                ));
            }
        }
        let unauthorized = |to: &str| {
            r.from
                .iter()
                .filter(|from| partners.contains_key(*from))
                .filter(|from| !matrix.may_ever_send(from, &r.message_type, to))
                .cloned()
                .collect::<Vec<_>>()
        };
        for pointer in r.when.keys().chain(std::iter::once(&r.municipality)) {
            if !pointer.starts_with('/') {
                errors.push(format!(
                    "{at}: {pointer:?} is not a JSON pointer (it starts with '/')"
                ));
            }
        }
        if r.to.is_empty() {
            errors.push(format!("{at}: to: at least one target is needed"));
        }
        for target in &r.to {
            match target {
                Target::Partner { partner } => {
                    if !partners.contains_key(partner) {
                        errors.push(format!("{at}: to: unknown partner {partner:?}"));
                    } else {
                        let refused = unauthorized(partner);
                        if !refused.is_empty() {
                            errors.push(format!(
                                "{at}: to: {} may not send {} to {partner} (authorization.toml)",
                                refused.join(", "),
                                r.message_type
                            ));
                        }
                    }
                }
                Target::Competent { competent, .. } => {
                    if !kinds.contains(competent.as_str()) {
                        errors.push(format!("{at}: to: no partner is of kind {competent:?}"));
                    }
                    for p in partners.values().filter(|p| &p.kind == competent) {
                        let refused = unauthorized(&p.id);
                        if !refused.is_empty() {
                            errors.push(format!(
                                "{at}: to: {} may not send {} to {} (kind {competent}; authorization.toml)",
                                refused.join(", "),
                                r.message_type,
                                p.id
                            ));
                        }
                    }
                }
            }
        }
        routes.push(Route {
            name: r.name,
            message_type: r.message_type,
            from: r.from.into_iter().collect(),
            when: conditions(r.when),
            municipality: Pointer::from(r.municipality),
            to: r.to,
        });
    }
    if errors.is_empty() {
        Ok(routes)
    } else {
        Err(errors)
    }
}

/// The recipients of one message, in the order they are delivered.
pub fn recipients<'a>(
    envelope: &Node,
    message_type: &str,
    sender: &Partner,
    directory: &'a Directory,
    tables: &Tables,
) -> Result<Vec<&'a Partner>, Rejection> {
    let partners = &directory.partners;
    if let Some(named) = envelope.get("recipient").and_then(Node::as_str) {
        let Some(partner) = partners.get(named) else {
            return Err(Rejection::one(
                Code::UnknownRecipient,
                FieldError::new(
                    "/recipient",
                    "recipient",
                    format!("no partner is called {named:?}"),
                ),
            ));
        };
        if partner.id == sender.id {
            return Err(Rejection::one(
                Code::UnknownRecipient,
                FieldError::new(
                    "/recipient",
                    "recipient",
                    "a partner cannot send a message to itself",
                ),
            ));
        }
        return Ok(vec![partner]);
    }
    let Some(route) = directory
        .routes
        .iter()
        .find(|r| r.matches(message_type, &sender.id, envelope))
    else {
        return Err(Rejection::one(
            Code::NoRoute,
            FieldError::new(
                "",
                "route",
                format!(
                    "no routing rule sends {message_type} from {} with this content",
                    sender.id
                ),
            ),
        ));
    };
    let municipality = route.municipality.get(envelope).and_then(Node::as_str);
    let mut out: Vec<&Partner> = Vec::new();
    for target in &route.to {
        let found = match target {
            Target::Partner { partner } => partners.get(partner),
            Target::Competent {
                competent,
                optional,
            } => {
                let found = municipality
                    .and_then(|m| tables.competent(competent, m))
                    .and_then(|id| partners.get(id));
                if found.is_none() && !optional {
                    return Err(Rejection::one(
                        Code::NoRoute,
                        FieldError::new(
                            route.municipality.as_str(),
                            "competence",
                            format!(
                                "no {competent} is competent for municipality {} (route {})",
                                municipality.unwrap_or("(missing)"),
                                route.name
                            ),
                        ),
                    ));
                }
                found
            }
        };
        if let Some(p) = found
            && p.id != sender.id
            && !out.iter().any(|o| o.id == p.id)
        {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(Rejection::one(
            Code::NoRoute,
            FieldError::new(
                "",
                "route",
                format!("route {} found no recipient", route.name),
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Directory;
    use serde_json::{Value, json};

    fn demo() -> Directory {
        Directory::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap()
    }

    fn route(d: &Directory, sender: &str, message: Value) -> Result<Vec<String>, Rejection> {
        let t = message["type"].as_str().unwrap().to_string();
        let message = Node::from(message);
        recipients(&message, &t, &d.partners[sender], d, &d.tables.load())
            .map(|r| r.iter().map(|p| p.id.clone()).collect())
    }

    fn benefit(benefit: &str, municipality: &str) -> Value {
        json!({"type": "benefit-status", "payload": {"benefit": benefit, "municipality": municipality}})
    }

    #[test]
    fn competence_follows_the_municipality() {
        let d = demo();
        assert_eq!(
            route(&d, "inps", benefit("naspi", "036005")).unwrap(),
            ["cpi-modena", "osservatorio-er"]
        );
        assert_eq!(
            route(&d, "inps", benefit("naspi", "037032")).unwrap(),
            ["cpi-bologna", "osservatorio-er"]
        );
    }

    #[test]
    fn inclusion_benefits_fan_out_where_a_comune_is_competent() {
        let d = demo();
        assert_eq!(
            route(&d, "inps", benefit("adi", "036023")).unwrap(),
            ["cpi-modena", "comune-modena", "osservatorio-er"]
        );
        assert_eq!(
            route(&d, "inps", benefit("sfl", "036005")).unwrap(),
            ["cpi-modena", "osservatorio-er"]
        );
    }

    #[test]
    fn a_required_competent_partner_missing_is_no_route() {
        let d = demo();
        let r = route(&d, "inps", benefit("naspi", "001272")).unwrap_err();
        assert_eq!(r.code, Code::NoRoute);
        assert_eq!(r.errors[0].path, "/payload/municipality");
    }

    #[test]
    fn when_conditions_select_the_rule() {
        let d = demo();
        let m = |reason: &str| json!({"type": "referral", "payload": {"reason": reason, "municipality": "036023"}});
        assert_eq!(
            route(&d, "comune-modena", m("employment-readiness")).unwrap(),
            ["cpi-modena"]
        );
        assert_eq!(
            route(&d, "comune-modena", m("social-support"))
                .unwrap_err()
                .code,
            Code::NoRoute
        );
        assert_eq!(
            route(&d, "cpi-modena", m("social-support")).unwrap(),
            ["inps"]
        );
    }

    #[test]
    fn the_first_rule_in_the_file_that_matches_wins() {
        let mut d = demo();
        let text = r#"
            [[route]]
            name = "naspi-to-modena"
            type = "benefit-status"
            from = ["inps"]
            when = { "/payload/benefit" = ["naspi"] }
            to = [{ partner = "cpi-modena" }]

            [[route]]
            name = "referrals"
            type = "referral"
            from = ["cpi-modena", "cpi-bologna"]
            to = [{ partner = "inps" }]

            [[route]]
            name = "the-rest-to-the-observatory"
            type = "benefit-status"
            from = ["inps"]
            to = [{ partner = "osservatorio-er" }]

            [[route]]
            name = "naspi-to-bologna"
            type = "benefit-status"
            from = ["inps"]
            when = { "/payload/benefit" = ["naspi"] }
            to = [{ partner = "cpi-bologna" }]
        "#;
        d.routes = load_routes(text, &d.partners, &d.matrix).unwrap();
        assert_eq!(
            route(&d, "inps", benefit("naspi", "037032")).unwrap(),
            ["cpi-modena"]
        );
        assert_eq!(
            route(&d, "inps", benefit("adi", "037032")).unwrap(),
            ["osservatorio-er"]
        );
        let referral = json!({"type": "referral", "payload": {"reason": "social-support"}});
        assert_eq!(
            route(&d, "cpi-bologna", referral.clone()).unwrap(),
            ["inps"]
        );
        assert_eq!(
            route(&d, "comune-modena", referral).unwrap_err().code,
            Code::NoRoute
        );
    }

    #[test]
    fn a_named_recipient_wins_and_must_exist() {
        let d = demo();
        let mut m = benefit("naspi", "036005");
        m["recipient"] = json!("cpi-bologna");
        assert_eq!(route(&d, "inps", m.clone()).unwrap(), ["cpi-bologna"]);
        m["recipient"] = json!("inail");
        assert_eq!(
            route(&d, "inps", m.clone()).unwrap_err().code,
            Code::UnknownRecipient
        );
        m["recipient"] = json!("inps");
        assert_eq!(
            route(&d, "inps", m).unwrap_err().code,
            Code::UnknownRecipient
        );
    }

    #[test]
    fn route_file_mistakes_are_all_reported() {
        let d = demo();
        let text = r#"
            [[route]]
            name = "a"
            type = "referral"
            from = ["inps", "nobody"]
            when = { "payload/reason" = ["x"] }
            to = [{ partner = "cpi-modena" }, { competent = "asl" }]
        "#;
        let errors = load_routes(text, &d.partners, &d.matrix).unwrap_err();
        assert_eq!(errors.len(), 5, "{errors:#?}");
    }
}
