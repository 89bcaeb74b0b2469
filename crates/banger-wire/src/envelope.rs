use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ErrorCode, ErrorObject, OpId, PROTOCOL_VERSION};

/// A request frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Caller-chosen id echoed in every frame of the answer.
    pub id: u64,
    /// Operation id to continue; the server mints one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<OpId>,
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

/// A response frame: `result`, `error`, or an intermediate `event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    /// The request's id; `None` when the request was too broken to read it.
    pub id: Option<u64>,
    pub op_id: OpId,
    #[serde(flatten)]
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    /// Progress of a long call; any number precede the final frame.
    Event(Value),
    /// Final frame of a successful call.
    Result(Value),
    /// Final frame of a failed call.
    Error(ErrorObject),
}

/// Why a frame could not be taken as a request, with whatever of the
/// envelope could be read so that the error answer can still carry the
/// caller's id and op id.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub id: Option<u64>,
    pub op_id: Option<OpId>,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    /// The error object to answer with, minting an op id if the caller sent none.
    pub fn into_response(self) -> Response {
        let op_id = self.op_id.unwrap_or_else(OpId::mint);
        Response {
            v: PROTOCOL_VERSION,
            id: self.id,
            op_id: op_id.clone(),
            body: ResponseBody::Error(ErrorObject {
                code: self.code,
                message: self.message,
                op_id,
                details: None,
            }),
        }
    }
}

impl Request {
    /// Parse one frame (without its trailing newline).
    ///
    /// The version is checked before the rest of the envelope, so that a
    /// newer client gets `bad_version` rather than a decode error about a
    /// field it added.
    pub fn parse(frame: &[u8]) -> Result<Request, RequestError> {
        let err = |id, op_id, code, message: String| RequestError {
            id,
            op_id,
            code,
            message,
        };
        let text = std::str::from_utf8(frame).map_err(|e| {
            err(
                None,
                None,
                ErrorCode::InvalidRequest,
                format!("frame is not valid UTF-8: {e}"),
            )
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            err(
                None,
                None,
                ErrorCode::InvalidRequest,
                format!("frame is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(obj) = &value else {
            return Err(err(
                None,
                None,
                ErrorCode::InvalidRequest,
                "request must be a JSON object".into(),
            ));
        };
        let id = obj.get("id").and_then(Value::as_u64);
        // A malformed op id is reported below, by the typed decode; here it is only
        // kept when valid so that the answer can carry it.
        let op_id = obj
            .get("op_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<OpId>().ok());
        match obj.get("v").and_then(Value::as_u64) {
            Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
            Some(v) => {
                return Err(err(
                    id,
                    op_id,
                    ErrorCode::BadVersion,
                    format!(
                        "protocol version {v} is not supported (this side speaks {PROTOCOL_VERSION}); \
                         upgrade or restart banger so that CLI and daemon match"
                    ),
                ));
            }
            None => {
                return Err(err(
                    id,
                    op_id,
                    ErrorCode::InvalidRequest,
                    "request has no numeric \"v\" (protocol version)".into(),
                ));
            }
        }
        let mut req: Request = serde_json::from_value(value).map_err(|e| {
            err(
                id,
                op_id.clone(),
                ErrorCode::InvalidRequest,
                format!("malformed request envelope: {e}"),
            )
        })?;
        if req.params.is_null() {
            req.params = Value::Object(Default::default());
        }
        Ok(req)
    }
}

/// Serialise a frame: compact JSON followed by `\n`.
pub fn encode_frame<T: Serialize>(frame: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(frame).expect("wire types always serialise");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_minimal_request_and_normalises_params() {
        let req = Request::parse(br#"{"v":1,"id":7,"method":"daemon.status"}"#).unwrap();
        assert_eq!(req.id, 7);
        assert_eq!(req.op_id, None);
        assert_eq!(req.params, json!({}));
    }

    #[test]
    fn keeps_caller_op_id() {
        let req =
            Request::parse(br#"{"v":1,"id":1,"op_id":"op-abc123","method":"m","params":null}"#)
                .unwrap();
        assert_eq!(req.op_id.unwrap().as_str(), "op-abc123");
    }

    #[test]
    fn bad_version_wins_over_unknown_fields_and_keeps_ids() {
        let e = Request::parse(br#"{"v":2,"id":9,"op_id":"op-zzzzzz","method":"x","future":true}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadVersion);
        assert_eq!(e.id, Some(9));
        assert_eq!(e.op_id.as_ref().unwrap().as_str(), "op-zzzzzz");
        let resp = e.into_response();
        let ResponseBody::Error(obj) = resp.body else {
            panic!()
        };
        assert_eq!(obj.op_id.as_str(), "op-zzzzzz");
    }

    #[test]
    fn broken_frames_are_invalid_request() {
        for frame in [
            &b"\xff\xfe"[..],
            b"{",
            b"[1,2]",
            b"{\"id\":1,\"method\":\"m\"}",
            br#"{"v":1,"id":1}"#,
            br#"{"v":1,"id":1,"method":"m","extra":1}"#,
            br#"{"v":1,"id":1,"method":"m","op_id":"nope"}"#,
        ] {
            let e = Request::parse(frame).unwrap_err();
            assert_eq!(
                e.code,
                ErrorCode::InvalidRequest,
                "{:?}",
                String::from_utf8_lossy(frame)
            );
        }
    }

    #[test]
    fn response_shape_on_the_wire() {
        let op: OpId = "op-aaaaaa".parse().unwrap();
        let ok = Response {
            v: 1,
            id: Some(3),
            op_id: op.clone(),
            body: ResponseBody::Result(json!({"x":1})),
        };
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!({"v":1,"id":3,"op_id":"op-aaaaaa","result":{"x":1}})
        );
        let back: Response = serde_json::from_slice(&encode_frame(&ok)).unwrap();
        assert_eq!(back, ok);
        let err = Response {
            v: 1,
            id: None,
            op_id: op.clone(),
            body: ResponseBody::Error(ErrorObject {
                code: ErrorCode::NotFound,
                message: "no".into(),
                op_id: op,
                details: None,
            }),
        };
        let wire = serde_json::to_value(&err).unwrap();
        assert_eq!(wire["error"]["code"], "not_found");
        assert_eq!(wire["error"]["op_id"], "op-aaaaaa");
    }

    #[test]
    fn unknown_error_codes_from_newer_peers_decode() {
        let obj: ErrorObject =
            serde_json::from_value(json!({"code":"brand_new","message":"m","op_id":"op-aaaaaa"}))
                .unwrap();
        assert_eq!(obj.code, ErrorCode::Unknown);
    }
}
