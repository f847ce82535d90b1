//! Pure parts: an InferencePool's selector and ports, and a pod's endpoints.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use crate::{Endpoint, ANNOTATION_EVENTS_PORT, ANNOTATION_REPLAY_PORT};

/// What an InferencePool (or the selector mode's flags) asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolSpec {
    /// `matchLabels` (pool mode): every label must match.
    pub match_labels: BTreeMap<String, String>,
    /// The label selector sent to the API server (`k=v,k2=v2`, or the selector flag).
    pub selector: String,
    /// Serving ports; each is its own endpoint per pod.
    pub ports: Vec<u16>,
}

/// An InferencePool's spec, either shape: v1 (`spec.selector.matchLabels`,
/// `spec.targetPorts[].number`) or v1alpha2 (`spec.selector` as a plain map,
/// `spec.targetPortNumber`). Errors say what is missing.
pub fn parse_pool(obj: &Value) -> Result<PoolSpec, String> {
    let spec = obj.get("spec").ok_or("the pool has no spec")?;
    let sel = spec.get("selector").ok_or("the pool has no spec.selector")?;
    // v1 nests the labels under matchLabels; v1alpha2 is the map itself.
    let labels = sel.get("matchLabels").unwrap_or(sel);
    let labels = labels.as_object().ok_or("spec.selector is not a map of labels")?;
    let mut match_labels = BTreeMap::new();
    for (k, v) in labels {
        if k == "matchExpressions" {
            return Err("spec.selector.matchExpressions is not supported (GIE pools use matchLabels)".into());
        }
        let v = v.as_str().ok_or_else(|| format!("selector label {k:?} is not a string"))?;
        match_labels.insert(k.clone(), v.to_string());
    }
    if match_labels.is_empty() {
        return Err("the pool's selector is empty (it would select every pod)".into());
    }
    let mut ports = Vec::new();
    if let Some(list) = spec.get("targetPorts").and_then(Value::as_array) {
        for p in list {
            let n = p.get("number").and_then(Value::as_u64).ok_or("a targetPorts entry has no number")?;
            ports.push(port(n)?);
        }
    } else if let Some(n) = spec.get("targetPortNumber").and_then(Value::as_u64) {
        ports.push(port(n)?);
    }
    if ports.is_empty() {
        return Err("the pool has no target ports (spec.targetPorts / spec.targetPortNumber)".into());
    }
    let selector = match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    Ok(PoolSpec { match_labels, selector, ports })
}

fn port(n: u64) -> Result<u16, String> {
    u16::try_from(n).ok().filter(|&p| p > 0).ok_or_else(|| format!("port {n} is out of range"))
}

/// A pod annotation that does not parse (the default port is used instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEndpointsError {
    pub pod: String,
    pub message: String,
}

/// The endpoints a pod contributes: one per target port while the pod matches
/// `match_labels`, has a `podIP`, is `Ready` and is not terminating; none otherwise.
/// `events_port` / `replay_port` (dial mode; annotations override them per pod) give
/// rank `i` (the `i`-th target port) the publisher at `port + i`. A malformed annotation
/// is reported and the configured port used.
pub fn endpoints_of_pod(
    pod: &Pod,
    spec: &PoolSpec,
    events_port: Option<u16>,
    replay_port: Option<u16>,
) -> (Vec<Endpoint>, Vec<PodEndpointsError>) {
    let mut errors = Vec::new();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    if spec.match_labels.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        return (Vec::new(), errors);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return (Vec::new(), errors);
    }
    let Some(status) = &pod.status else { return (Vec::new(), errors) };
    let Some(ip) = status.pod_ip.clone().filter(|ip| !ip.is_empty()) else { return (Vec::new(), errors) };
    let ready =
        status.conditions.as_ref().is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return (Vec::new(), errors);
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let mut annotated = |key: &str, default: Option<u16>| match annotations.get(key) {
        None => default,
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                errors.push(PodEndpointsError {
                    pod: name.clone(),
                    message: format!("annotation {key}={v:?} is not a port (1–65535); using {default:?}"),
                });
                default
            }
        },
    };
    let events = annotated(ANNOTATION_EVENTS_PORT, events_port);
    let replay = annotated(ANNOTATION_REPLAY_PORT, replay_port);
    // IPv6 pod IPs need brackets in host:port and tcp:// endpoints.
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.clone() };
    let at = |base: Option<u16>, rank: usize| {
        base.and_then(|b| b.checked_add(rank as u16)).map(|p| format!("tcp://{host}:{p}"))
    };
    let eps = spec
        .ports
        .iter()
        .enumerate()
        .map(|(rank, &port)| Endpoint {
            name: format!("{host}:{port}"),
            pod: name.clone(),
            ip: ip.clone(),
            port,
            labels: labels.clone(),
            events: at(events, rank),
            replay: events.and(at(replay, rank)),
        })
        .collect();
    (eps, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_pool_shapes_parse() {
        let v1 = json!({"spec": {"selector": {"matchLabels": {"app": "vllm", "model": "q"}},
                                 "targetPorts": [{"number": 8000}, {"number": 8001}],
                                 "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}});
        let p = parse_pool(&v1).unwrap();
        assert_eq!(p.ports, vec![8000, 8001]);
        assert_eq!(p.selector, "app=vllm,model=q");
        let alpha = json!({"spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000,
                                    "extensionRef": {"name": "epp"}}});
        let p = parse_pool(&alpha).unwrap();
        assert_eq!((p.ports, p.selector), (vec![8000], "app=vllm".to_string()));
    }

    #[test]
    fn pools_without_selector_or_ports_are_errors() {
        assert!(parse_pool(&json!({"spec": {"targetPortNumber": 8000}})).unwrap_err().contains("selector"));
        assert!(parse_pool(&json!({"spec": {"selector": {"matchLabels": {}}, "targetPortNumber": 8000}}))
            .unwrap_err()
            .contains("empty"));
        assert!(parse_pool(&json!({"spec": {"selector": {"app": "x"}}})).unwrap_err().contains("target ports"));
        assert!(parse_pool(&json!({"spec": {"selector": {"app": "x"}, "targetPortNumber": 70000}}))
            .unwrap_err()
            .contains("out of range"));
    }

    fn pod(labels: Value, ip: Option<&str>, ready: &str, annotations: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p1", "labels": labels, "annotations": annotations},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    fn spec() -> PoolSpec {
        parse_pool(&json!({"spec": {"selector": {"app": "vllm"}, "targetPorts": [{"number": 8000}, {"number": 8001}]}}))
            .unwrap()
    }

    #[test]
    fn a_ready_matching_pod_gives_one_endpoint_per_port_with_its_event_ranks() {
        let p = pod(json!({"app": "vllm", "llm-d.ai/role": "decode"}), Some("10.0.0.7"), "True", json!({}));
        let (eps, errs) = endpoints_of_pod(&p, &spec(), Some(5557), Some(5558));
        assert!(errs.is_empty());
        let names: Vec<_> = eps.iter().map(|e| (e.name.as_str(), e.events.as_deref(), e.replay.as_deref())).collect();
        assert_eq!(
            names,
            vec![
                ("10.0.0.7:8000", Some("tcp://10.0.0.7:5557"), Some("tcp://10.0.0.7:5558")),
                ("10.0.0.7:8001", Some("tcp://10.0.0.7:5558"), Some("tcp://10.0.0.7:5559")),
            ]
        );
        assert_eq!(eps[0].labels.get("llm-d.ai/role").map(String::as_str), Some("decode"));
    }

    #[test]
    fn unready_unaddressed_unmatched_or_terminating_pods_give_nothing() {
        let s = spec();
        assert!(endpoints_of_pod(&pod(json!({"app": "vllm"}), Some("10.0.0.7"), "False", json!({})), &s, None, None)
            .0
            .is_empty());
        assert!(endpoints_of_pod(&pod(json!({"app": "vllm"}), None, "True", json!({})), &s, None, None).0.is_empty());
        assert!(endpoints_of_pod(&pod(json!({"app": "other"}), Some("10.0.0.7"), "True", json!({})), &s, None, None)
            .0
            .is_empty());
        let mut t = pod(json!({"app": "vllm"}), Some("10.0.0.7"), "True", json!({}));
        t.metadata.deletion_timestamp = Some(serde_json::from_value(json!("2026-11-30T00:00:00Z")).unwrap());
        assert!(endpoints_of_pod(&t, &s, None, None).0.is_empty());
    }

    #[test]
    fn annotations_override_ports_and_bad_ones_are_reported_not_fatal() {
        let s = spec();
        let p = pod(
            json!({"app": "vllm"}),
            Some("10.0.0.7"),
            "True",
            json!({ANNOTATION_EVENTS_PORT: "6000", ANNOTATION_REPLAY_PORT: "lots"}),
        );
        let (eps, errs) = endpoints_of_pod(&p, &s, Some(5557), Some(5558));
        assert_eq!(eps[0].events.as_deref(), Some("tcp://10.0.0.7:6000"));
        assert_eq!(eps[0].replay.as_deref(), Some("tcp://10.0.0.7:5558"), "the bad annotation falls back");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains(ANNOTATION_REPLAY_PORT), "{:?}", errs[0]);
        // Bind mode: no events port configured or annotated → nothing to dial.
        let (eps, _) =
            endpoints_of_pod(&pod(json!({"app": "vllm"}), Some("10.0.0.7"), "True", json!({})), &s, None, None);
        assert_eq!((eps[0].events.as_deref(), eps[0].replay.as_deref()), (None, None));
    }

    #[test]
    fn ipv6_pods_are_bracketed() {
        let p = pod(json!({"app": "vllm"}), Some("fd00::7"), "True", json!({}));
        let (eps, _) = endpoints_of_pod(&p, &spec(), Some(5557), None);
        assert_eq!(eps[0].name, "[fd00::7]:8000");
        assert_eq!(eps[0].events.as_deref(), Some("tcp://[fd00::7]:5557"));
    }
}
