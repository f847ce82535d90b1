//! ZMQ topics: `kv@<pod>@<model>` (llm-d's convention) or anything else.

/// What a topic says about its publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topic<'a> {
    /// The pod identity (`10.0.0.1:8000`); the whole topic when it has no `kv@` form.
    pub pod: &'a str,
    /// The served model; empty when the topic does not name one.
    pub model: &'a str,
}

/// `kv@10.0.0.1:8000@Qwen/Qwen3-0.6B` → pod `10.0.0.1:8000`, model `Qwen/Qwen3-0.6B`.
/// The model is what follows the last `@`, so pods may contain `:`; a topic without the
/// `kv@` prefix is taken whole as the pod (vLLM's default topic is `""`).
pub fn parse_topic(topic: &str) -> Topic<'_> {
    match topic.strip_prefix("kv@") {
        Some(rest) => match rest.rfind('@') {
            Some(at) => Topic { pod: &rest[..at], model: &rest[at + 1..] },
            None => Topic { pod: rest, model: "" },
        },
        None => Topic { pod: topic, model: "" },
    }
}

/// The index pod of data-parallel rank `rank` of `pod`: `pod` itself for rank 0,
/// `<pod>#dp<rank>` for the others.
pub fn rank_pod(pod: &str, rank: i64) -> String {
    if rank <= 0 {
        pod.to_string()
    } else {
        format!("{pod}#dp{rank}")
    }
}

/// Whether `name` is `pod` or one of its data-parallel ranks ([`rank_pod`]).
pub fn is_pod_or_rank(name: &str, pod: &str) -> bool {
    name.strip_prefix(pod).is_some_and(|rest| rest.is_empty() || rest.starts_with("#dp"))
}

/// `tcp://host:port` with the port moved by `offset` (vLLM offsets each data-parallel
/// rank's endpoints by its rank). Other transports are returned unchanged.
pub fn offset_endpoint(endpoint: &str, offset: u16) -> String {
    if offset == 0 {
        return endpoint.to_string();
    }
    if let Some(rest) = endpoint.strip_prefix("tcp://") {
        if let Some(colon) = rest.rfind(':') {
            if let Ok(port) = rest[colon + 1..].parse::<u16>() {
                if port != 0 {
                    return format!("tcp://{}:{}", &rest[..colon], port.saturating_add(offset));
                }
            }
        }
    }
    endpoint.to_string()
}

/// The host part of a pod identity `host:port` (`[v6]:port` and bare hosts accepted).
pub fn pod_host(pod: &str) -> &str {
    if let Some(end) = pod.strip_prefix('[').and_then(|r| r.find(']')) {
        return &pod[..end + 2];
    }
    match pod.rfind(':') {
        Some(c) if pod[..c].find(':').is_none() => &pod[..c],
        _ => pod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_pods() {
        assert_eq!(rank_pod("10.0.0.1:8000", 0), "10.0.0.1:8000");
        assert_eq!(rank_pod("10.0.0.1:8000", 2), "10.0.0.1:8000#dp2");
        assert!(is_pod_or_rank("10.0.0.1:8000", "10.0.0.1:8000"));
        assert!(is_pod_or_rank("10.0.0.1:8000#dp2", "10.0.0.1:8000"));
        assert!(!is_pod_or_rank("10.0.0.1:80001", "10.0.0.1:8000"), "another pod sharing the prefix");
        assert!(!is_pod_or_rank("10.0.0.1:800", "10.0.0.1:8000"));
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("kv@10.0.0.1:8000@Qwen/Qwen3-0.6B"),
            Topic { pod: "10.0.0.1:8000", model: "Qwen/Qwen3-0.6B" }
        );
        assert_eq!(parse_topic("kv@pod-a@m@x"), Topic { pod: "pod-a@m", model: "x" });
        assert_eq!(parse_topic("kv@pod-a"), Topic { pod: "pod-a", model: "" });
        assert_eq!(parse_topic("kv-events"), Topic { pod: "kv-events", model: "" });
        assert_eq!(parse_topic(""), Topic { pod: "", model: "" });
    }

    #[test]
    fn endpoints_and_hosts() {
        assert_eq!(offset_endpoint("tcp://10.0.0.1:5557", 2), "tcp://10.0.0.1:5559");
        assert_eq!(offset_endpoint("tcp://*:0", 2), "tcp://*:0");
        assert_eq!(offset_endpoint("ipc:///tmp/x", 1), "ipc:///tmp/x");
        assert_eq!(pod_host("10.0.0.1:8000"), "10.0.0.1");
        assert_eq!(pod_host("[::1]:8000"), "[::1]");
        assert_eq!(pod_host("pod-a"), "pod-a");
    }
}
