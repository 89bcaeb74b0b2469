//! Arbitrary bytes through the frame reader and the envelope parser: no
//! panic, the size bound holds, and every rejection is a typed error that
//! serialises into a valid response frame.
#![no_main]

use banger_rpc::frame::read_frame;
use banger_wire::{PROTOCOL_VERSION, Request, Response};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(64, data);
        while let Ok(Some(frame)) = read_frame(&mut reader, LIMIT).await {
            assert!(frame.len() <= LIMIT);
            match Request::parse(&frame) {
                Ok(req) => {
                    // What the server relies on: our version, params never
                    // null, and the request means the same once re-encoded.
                    assert_eq!(req.v, PROTOCOL_VERSION);
                    assert!(!req.params.is_null());
                    let again = Request::parse(&serde_json::to_vec(&req).unwrap()).unwrap();
                    assert_eq!(again, req);
                }
                Err(e) => {
                    let resp = e.into_response();
                    let wire = serde_json::to_vec(&resp).unwrap();
                    let back: Response = serde_json::from_slice(&wire).unwrap();
                    assert_eq!(back, resp);
                }
            }
        }
    });
});
