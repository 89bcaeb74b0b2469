//! Mapping service-level errors onto RPC error codes.

use banger_rpc::RpcError;
use banger_store::StoreError;

pub fn store_err(e: StoreError) -> RpcError {
    let msg = chain(&e);
    match e {
        StoreError::NotFound { .. } => RpcError::not_found(msg),
        StoreError::NameTaken { .. } | StoreError::Conflict(_) | StoreError::ImageInUse { .. } => {
            RpcError::conflict(msg)
        }
        StoreError::Invalid { .. } => RpcError::invalid_params(msg),
        _ => RpcError::internal(msg),
    }
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}
