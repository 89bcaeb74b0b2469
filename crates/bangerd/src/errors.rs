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

pub use banger_rpc::error_chain as chain;
