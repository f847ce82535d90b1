//! Filters: which pods stay candidates.
//!
//! The role filters keep llm-d's role sets on the pod label `llm-d.ai/role`
//! (llm-d-router `filter/bylabel/roles.go`): `decode-filter` also keeps pods **without**
//! the label (a fleet that does not disaggregate labels nothing), `prefill-filter` and
//! `encode-filter` do not.

use serde_json::Value;

use crate::{ConfigError, Filter, PodView, RequestView};

/// llm-d's role label.
pub const ROLE: &str = "llm-d.ai/role";

/// Roles `decode-filter` keeps (and pods without the label).
pub const DECODE_ROLES: &[&str] = &["decode", "prefill-decode", "both", "encode-prefill-decode"];
/// Roles `prefill-filter` keeps.
pub const PREFILL_ROLES: &[&str] = &["prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"];
/// Roles `encode-filter` keeps.
pub const ENCODE_ROLES: &[&str] = &["encode", "encode-prefill", "encode-prefill-decode"];

/// Drops pods whose KV cache is fuller than `threshold` (unless that drops every pod).
pub(crate) struct SaturationFilter {
    pub(crate) threshold: f64,
}
impl Filter for SaturationFilter {
    fn name(&self) -> &str {
        "saturation-filter"
    }
    fn filter(&self, _r: &RequestView, pods: &[PodView]) -> Vec<usize> {
        let keep: Vec<usize> =
            (0..pods.len()).filter(|&i| pods[i].kv_usage.is_none_or(|u| u <= self.threshold)).collect();
        if keep.is_empty() {
            (0..pods.len()).collect()
        } else {
            keep
        }
    }
}

/// One label requirement.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Requirement {
    /// The label is present with one of these values (or absent, when `allows_missing`).
    In {
        key: String,
        values: Vec<String>,
        allows_missing: bool,
    },
    /// The label is absent or has none of these values.
    NotIn {
        key: String,
        values: Vec<String>,
    },
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn admits(&self, pod: &PodView) -> bool {
        match self {
            Requirement::In { key, values, allows_missing } => match pod.labels.get(key) {
                Some(v) => values.contains(v),
                None => *allows_missing,
            },
            Requirement::NotIn { key, values } => pod.labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => pod.labels.contains_key(k),
            Requirement::DoesNotExist(k) => !pod.labels.contains_key(k),
        }
    }
}

/// Keeps pods that meet every requirement (`label-selector-filter`, `by-label`, the role
/// filters).
pub(crate) struct LabelFilter {
    pub(crate) name: &'static str,
    pub(crate) requirements: Vec<Requirement>,
}
impl Filter for LabelFilter {
    fn name(&self) -> &str {
        self.name
    }
    fn filter(&self, _r: &RequestView, pods: &[PodView]) -> Vec<usize> {
        (0..pods.len()).filter(|&i| self.requirements.iter().all(|r| r.admits(&pods[i]))).collect()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

pub(crate) fn role_filter(name: &'static str, roles: &[&str], allows_missing: bool) -> LabelFilter {
    LabelFilter {
        name,
        requirements: vec![Requirement::In {
            key: ROLE.into(),
            values: roles.iter().map(|s| s.to_string()).collect(),
            allows_missing,
        }],
    }
}

/// `label-selector-filter`: Kubernetes `matchLabels` and `matchExpressions`
/// (`In`, `NotIn`, `Exists`, `DoesNotExist`).
pub(crate) fn label_selector(params: &Value) -> Result<LabelFilter, ConfigError> {
    let mut requirements = Vec::new();
    if let Some(m) = params.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            let v = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            requirements.push(Requirement::In { key: k.clone(), values: vec![v], allows_missing: false });
        }
    }
    for e in params.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
        let key = e.get("key").and_then(Value::as_str).unwrap_or_default().to_string();
        let values = strings(e.get("values").unwrap_or(&Value::Null));
        let bad = |why: &str| ConfigError::Param {
            plugin: "label-selector-filter".into(),
            param: "matchExpressions".into(),
            why: why.into(),
        };
        if key.is_empty() {
            return Err(bad("an expression has no key"));
        }
        requirements.push(match e.get("operator").and_then(Value::as_str) {
            Some("In") => Requirement::In { key, values, allows_missing: false },
            Some("NotIn") => Requirement::NotIn { key, values },
            Some("Exists") => Requirement::Exists(key),
            Some("DoesNotExist") => Requirement::DoesNotExist(key),
            other => return Err(bad(&format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"))),
        });
    }
    Ok(LabelFilter { name: "label-selector-filter", requirements })
}

/// `by-label` (deprecated in llm-d): `label`, `validValues`, `allowsNoLabel`.
pub(crate) fn by_label(params: &Value) -> Result<LabelFilter, ConfigError> {
    let key = params.get("label").and_then(Value::as_str).unwrap_or_default().to_string();
    let values = strings(params.get("validValues").unwrap_or(&Value::Null));
    let allows_missing = params.get("allowsNoLabel").and_then(Value::as_bool).unwrap_or(false);
    if key.is_empty() {
        return Err(ConfigError::Param { plugin: "by-label".into(), param: "label".into(), why: "must be set".into() });
    }
    if values.is_empty() && !allows_missing {
        return Err(ConfigError::Param {
            plugin: "by-label".into(),
            param: "validValues".into(),
            why: "empty while allowsNoLabel is false: no pod could pass".into(),
        });
    }
    Ok(LabelFilter { name: "by-label", requirements: vec![Requirement::In { key, values, allows_missing }] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(role: Option<&str>) -> PodView {
        let mut p = PodView { name: role.unwrap_or("none").into(), ..Default::default() };
        if let Some(r) = role {
            p.labels.insert(ROLE.into(), r.into());
        }
        p
    }

    fn kept(f: &LabelFilter, pods: &[PodView]) -> Vec<String> {
        f.filter(&RequestView::default(), pods).into_iter().map(|i| pods[i].name.clone()).collect()
    }

    #[test]
    fn role_filters_keep_llm_d_role_sets() {
        let roles = [
            None,
            Some("decode"),
            Some("prefill"),
            Some("encode"),
            Some("prefill-decode"),
            Some("encode-prefill"),
            Some("encode-prefill-decode"),
            Some("both"),
            Some("other"),
        ];
        let pods: Vec<PodView> = roles.iter().map(|r| labelled(*r)).collect();
        let decode = role_filter("decode-filter", DECODE_ROLES, true);
        assert_eq!(kept(&decode, &pods), ["none", "decode", "prefill-decode", "encode-prefill-decode", "both"]);
        let prefill = role_filter("prefill-filter", PREFILL_ROLES, false);
        assert_eq!(
            kept(&prefill, &pods),
            ["prefill", "prefill-decode", "encode-prefill", "encode-prefill-decode", "both"]
        );
        let encode = role_filter("encode-filter", ENCODE_ROLES, false);
        assert_eq!(kept(&encode, &pods), ["encode", "encode-prefill", "encode-prefill-decode"]);
    }

    #[test]
    fn label_selector_and_by_label() {
        let pods: Vec<PodView> = [None, Some("decode"), Some("prefill")].iter().map(|r| labelled(*r)).collect();
        let p = serde_json::json!({"matchExpressions": [{"key": ROLE, "operator": "NotIn", "values": ["prefill"]}]});
        assert_eq!(kept(&label_selector(&p).unwrap(), &pods), ["none", "decode"]);
        let p = serde_json::json!({"matchLabels": {ROLE: "prefill"}});
        assert_eq!(kept(&label_selector(&p).unwrap(), &pods), ["prefill"]);
        let p = serde_json::json!({"matchExpressions": [{"key": ROLE, "operator": "Exists"}]});
        assert_eq!(kept(&label_selector(&p).unwrap(), &pods), ["decode", "prefill"]);
        let p = serde_json::json!({"matchExpressions": [{"key": ROLE, "operator": "Near"}]});
        assert!(label_selector(&p).is_err());
        let p = serde_json::json!({"label": ROLE, "validValues": ["decode"], "allowsNoLabel": true});
        assert_eq!(kept(&by_label(&p).unwrap(), &pods), ["none", "decode"]);
        assert!(by_label(&serde_json::json!({"label": ROLE})).is_err());
    }
}
