//! Building and reading ext_proc protocol messages (`envoy.service.ext_proc.v3`).

use envoy_types::pb::envoy::config::core::v3::{header_value_option::HeaderAppendAction, HeaderMap, HeaderValue};
use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, Metadata};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, common_response::ResponseStatus, processing_response, BodyMutation, BodyResponse, CommonResponse,
    HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

/// Envoy's `ProcessingMode.BodySendMode`, as announced in `protocol_config`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyMode {
    None,
    Streamed,
    /// Also the assumption when Envoy does not say (older Envoys).
    #[default]
    Buffered,
    BufferedPartial,
    FullDuplexStreamed,
}

impl BodyMode {
    pub fn from_i32(v: i32) -> Self {
        match v {
            0 => Self::None,
            1 => Self::Streamed,
            3 => Self::BufferedPartial,
            4 => Self::FullDuplexStreamed,
            _ => Self::Buffered,
        }
    }
}

/// A `mode_override` that buffers the request body and keeps the other modes as Envoy
/// runs them (headers and trailers sent, the response body as announced).
pub fn buffer_request_body(
    response: BodyMode,
) -> envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode {
    let code = |m: BodyMode| match m {
        BodyMode::None => 0,
        BodyMode::Streamed => 1,
        BodyMode::Buffered => 2,
        BodyMode::BufferedPartial => 3,
        BodyMode::FullDuplexStreamed => 4,
    };
    envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode {
        request_header_mode: 1,
        response_header_mode: 1,
        request_body_mode: code(BodyMode::Buffered),
        response_body_mode: code(response),
        request_trailer_mode: 0,
        response_trailer_mode: 0,
    }
}

/// Header (name, value) pairs; names lower-case as Envoy sends them. Envoy ≥ 1.27 puts
/// values in `raw_value`.
pub fn headers(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    map.map(|m| {
        m.headers
            .iter()
            .map(|h| {
                let v =
                    if h.raw_value.is_empty() { h.value.clone() } else { String::from_utf8_lossy(&h.raw_value).into() };
                (h.key.to_ascii_lowercase(), v)
            })
            .collect()
    })
    .unwrap_or_default()
}

/// `filter_metadata["envoy.lb.subset_hint"]["x-gateway-destination-endpoint-subset"]`.
pub fn subset_hint(meta: Option<&Metadata>) -> Option<Vec<String>> {
    let s = meta?.filter_metadata.get("envoy.lb.subset_hint")?;
    let v = s.fields.get("x-gateway-destination-endpoint-subset")?;
    match &v.kind {
        Some(Kind::ListValue(l)) => Some(
            l.values
                .iter()
                .filter_map(|x| match &x.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        Some(Kind::StringValue(s)) => Some(s.split(',').map(|x| x.trim().to_string()).collect()),
        _ => None,
    }
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": endpoints}}`.
pub fn lb_metadata(endpoints: &str) -> Struct {
    let inner = Struct { fields: [(super::DESTINATION_HEADER.to_string(), string(endpoints))].into() };
    Struct { fields: [("envoy.lb".to_string(), Value { kind: Some(Kind::StructValue(inner)) })].into() }
}

fn mutation(set: Vec<(String, String)>) -> Option<HeaderMutation> {
    mutation_removing(set, &[])
}

/// Sets `set` (overwriting any value the request had) and removes the `remove` headers.
fn mutation_removing(set: Vec<(String, String)>, remove: &[&str]) -> Option<HeaderMutation> {
    (!set.is_empty() || !remove.is_empty()).then(|| HeaderMutation {
        set_headers: set
            .into_iter()
            .map(|(k, v)| HeaderValueOption {
                header: Some(HeaderValue { key: k, raw_value: v.into_bytes(), ..Default::default() }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            })
            .collect(),
        remove_headers: remove.iter().map(|h| h.to_string()).collect(),
    })
}

fn reply(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse { response: Some(r), ..Default::default() }
}

fn common(set: Vec<(String, String)>, remove: &[&str], clear_route_cache: bool) -> CommonResponse {
    CommonResponse {
        status: ResponseStatus::Continue as i32,
        header_mutation: mutation_removing(set, remove),
        clear_route_cache,
        ..Default::default()
    }
}

/// Builders of the replies the server sends.
pub struct Reply;

impl Reply {
    /// The answer to the request headers: sets `set` (overwriting) and removes `remove`.
    pub fn request_headers(set: Vec<(String, String)>, remove: &[&str], clear_route_cache: bool) -> ProcessingResponse {
        reply(processing_response::Response::RequestHeaders(HeadersResponse {
            response: Some(common(set, remove, clear_route_cache)),
        }))
    }

    /// Continue (buffered / streamed modes), optionally setting and removing request headers.
    pub fn request_body_continue(
        set: Vec<(String, String)>,
        remove: &[&str],
        clear_route_cache: bool,
    ) -> ProcessingResponse {
        reply(processing_response::Response::RequestBody(BodyResponse {
            response: Some(common(set, remove, clear_route_cache)),
        }))
    }

    /// A body chunk sent back (full-duplex mode) or a plain continue (other modes).
    pub fn request_body_chunk(mode: BodyMode, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
        reply(processing_response::Response::RequestBody(BodyResponse {
            response: Some(streamed(mode, body, end_of_stream)),
        }))
    }

    pub fn request_trailers() -> ProcessingResponse {
        reply(processing_response::Response::RequestTrailers(TrailersResponse::default()))
    }

    pub fn response_headers(set: Vec<(String, String)>) -> ProcessingResponse {
        reply(processing_response::Response::ResponseHeaders(HeadersResponse {
            response: Some(common(set, &[], false)),
        }))
    }

    pub fn response_body(mode: BodyMode, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
        reply(processing_response::Response::ResponseBody(BodyResponse {
            response: Some(streamed(mode, body, end_of_stream)),
        }))
    }

    pub fn response_trailers() -> ProcessingResponse {
        reply(processing_response::Response::ResponseTrailers(TrailersResponse::default()))
    }

    /// An error answered by Envoy on kvroute's behalf (JSON like the HTTP gateway's).
    pub fn immediate(status: u16, message: &str) -> ProcessingResponse {
        // The gateway's error body (OpenAI style), with Retry-After on 429 and 503.
        let kind = kvroute_gateway::error_type(kvroute_gateway::StatusCode::from_u16(status).unwrap_or_default());
        let body = serde_json::json!({"error": {"message": message, "type": kind, "code": status}}).to_string();
        let mut headers = vec![("content-type".into(), "application/json".into())];
        if status == 429 || status == 503 {
            headers.push(("retry-after".into(), "1".into()));
        }
        reply(processing_response::Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus { code: status as i32 }),
            headers: mutation(headers),
            body: body.into_bytes(),
            details: format!("kvroute_{status}"),
            ..Default::default()
        }))
    }
}

fn streamed(mode: BodyMode, body: Vec<u8>, end_of_stream: bool) -> CommonResponse {
    if mode != BodyMode::FullDuplexStreamed {
        return common(vec![], &[], false);
    }
    CommonResponse {
        status: ResponseStatus::Continue as i32,
        body_mutation: Some(BodyMutation {
            mutation: Some(body_mutation::Mutation::StreamedResponse(StreamedBodyResponse {
                body,
                end_of_stream,
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    #[test]
    fn subset_hint_and_headers_are_read_as_envoy_sends_them() {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue { values: vec![string("10.0.0.1:8000"), string("10.0.0.2")] })),
        };
        let hint = Struct { fields: [("x-gateway-destination-endpoint-subset".to_string(), list)].into() };
        let meta =
            Metadata { filter_metadata: [("envoy.lb.subset_hint".to_string(), hint)].into(), ..Default::default() };
        assert_eq!(subset_hint(Some(&meta)), Some(vec!["10.0.0.1:8000".to_string(), "10.0.0.2".to_string()]));
        assert_eq!(subset_hint(None), None);
        let map = HeaderMap {
            headers: vec![
                HeaderValue { key: ":path".into(), raw_value: b"/v1/completions".to_vec(), ..Default::default() },
                HeaderValue { key: "X-Session-Id".into(), value: "s1".into(), ..Default::default() },
            ],
        };
        assert_eq!(
            headers(Some(&map)),
            vec![(":path".into(), "/v1/completions".into()), ("x-session-id".into(), "s1".into())]
        );
    }

    #[test]
    fn full_duplex_chunks_carry_the_body_and_other_modes_just_continue() {
        let r = Reply::request_body_chunk(BodyMode::FullDuplexStreamed, b"abc".to_vec(), true);
        let Some(processing_response::Response::RequestBody(b)) = r.response else { panic!("not a body reply") };
        let m = b.response.and_then(|c| c.body_mutation).and_then(|m| m.mutation);
        assert_eq!(
            m,
            Some(body_mutation::Mutation::StreamedResponse(StreamedBodyResponse {
                body: b"abc".to_vec(),
                end_of_stream: true,
                ..Default::default()
            }))
        );
        let r = Reply::request_body_chunk(BodyMode::Buffered, b"abc".to_vec(), true);
        let Some(processing_response::Response::RequestBody(b)) = r.response else { panic!("not a body reply") };
        assert!(b.response.is_some_and(|c| c.body_mutation.is_none()));
        let r = Reply::request_body_continue(vec![("a".into(), "1".into())], &["x-prefiller-host-port"], true);
        let Some(processing_response::Response::RequestBody(b)) = r.response else { panic!("not a body reply") };
        let m = b.response.and_then(|c| c.header_mutation).unwrap_or_default();
        assert_eq!((m.set_headers.len(), m.remove_headers), (1, vec!["x-prefiller-host-port".to_string()]));
        let meta = lb_metadata("a:1,b:2");
        let Some(Kind::StructValue(inner)) = &meta.fields["envoy.lb"].kind else { panic!("no envoy.lb") };
        assert_eq!(inner.fields[super::super::DESTINATION_HEADER].kind, Some(Kind::StringValue("a:1,b:2".into())));
    }
}
