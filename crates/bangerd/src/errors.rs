//! Each service has its own error type; this is the one place where they
//! become wire errors (`RpcError`: a code and a message), at the route
//! boundary. A service never builds an `RpcError` itself.

use banger_oci::{PullError, RegistryError};
use banger_rpc::RpcError;
use banger_store::StoreError;
use banger_wire::ErrorCode;

use crate::forward::ForwardError;
use crate::helper::HelperError;
use crate::images::ImageError;
use crate::network::NetworkError;
use crate::ops::{CancelError, NoSuchOperation};
use crate::secrets::SecretError;
use crate::sessions::SessionError;
use crate::vms::VmError;
use crate::workspaces::WorkspaceError;

pub use banger_rpc::error_chain as chain;

/// The wire error for `e`: `code`, and `e` with its sources as the message.
fn wire(code: ErrorCode, e: &dyn std::error::Error) -> RpcError {
    RpcError::new(code, chain(e))
}

fn store_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::NotFound { .. } => ErrorCode::NotFound,
        StoreError::NameTaken { .. }
        | StoreError::Conflict(_)
        | StoreError::ImageInUse { .. }
        | StoreError::ImageKeptBySnapshots { .. } => ErrorCode::Conflict,
        StoreError::Invalid { .. } => ErrorCode::InvalidParams,
        _ => ErrorCode::Internal,
    }
}

fn registry_code(e: &RegistryError) -> ErrorCode {
    match e {
        RegistryError::NotFound { .. } => ErrorCode::NotFound,
        RegistryError::Auth { .. } => ErrorCode::PermissionDenied,
        RegistryError::Unreachable { .. } | RegistryError::Status { .. } => ErrorCode::Unavailable,
        RegistryError::Manifest { .. }
        | RegistryError::WrongPlatform { .. }
        | RegistryError::Config { .. }
        | RegistryError::Credentials(_) => ErrorCode::InvalidParams,
        _ => ErrorCode::Internal,
    }
}

fn pull_code(e: &PullError) -> ErrorCode {
    match e {
        PullError::Registry(r) => registry_code(r),
        e if e.is_refusal() => ErrorCode::InvalidParams,
        PullError::Import { .. } => ErrorCode::InvalidParams,
        _ => ErrorCode::Internal,
    }
}

fn helper_code(e: &HelperError) -> ErrorCode {
    match e {
        HelperError::Refused { code, .. } => *code,
        HelperError::Unavailable(_) => ErrorCode::Unavailable,
    }
}

fn network_code(e: &NetworkError) -> ErrorCode {
    match e {
        NetworkError::Helper(h) => helper_code(h),
        NetworkError::HostRoutes(_) => ErrorCode::Internal,
        NetworkError::NoFreeSubnet(_) => ErrorCode::Conflict,
        NetworkError::TapPool(_) | NetworkError::NoTap(_) => ErrorCode::Unavailable,
    }
}

fn forward_code(e: &ForwardError) -> ErrorCode {
    match e {
        ForwardError::Invalid(_) => ErrorCode::InvalidParams,
        ForwardError::Taken(_) => ErrorCode::Conflict,
        ForwardError::CannotListen(_) => ErrorCode::Internal,
        ForwardError::Store(s) => store_code(s),
    }
}

fn image_code(e: &ImageError) -> ErrorCode {
    match e {
        ImageError::Invalid(_) => ErrorCode::InvalidParams,
        ImageError::NotFound(_) => ErrorCode::NotFound,
        ImageError::Conflict(_) => ErrorCode::Conflict,
        ImageError::Unavailable(_) => ErrorCode::Unavailable,
        ImageError::Failed(_) | ImageError::Task(_) => ErrorCode::Internal,
        ImageError::Store(s) => store_code(s),
        ImageError::Registry(r) => registry_code(r),
        ImageError::Pull(p) => pull_code(p),
    }
}

fn vm_code(e: &VmError) -> ErrorCode {
    match e {
        VmError::Invalid(_) => ErrorCode::InvalidParams,
        VmError::NotFound(_) => ErrorCode::NotFound,
        VmError::Conflict(_) => ErrorCode::Conflict,
        VmError::Launch { source, .. } => match source {
            banger_vmm::VmmError::DiskInUse { .. } => ErrorCode::Conflict,
            _ => ErrorCode::Internal,
        },
        VmError::Unavailable(_) | VmError::Agent(_) => ErrorCode::Unavailable,
        VmError::Failed(_) | VmError::Task(_) => ErrorCode::Internal,
        VmError::Store(s) => store_code(s),
        VmError::Image(i) => image_code(i),
        VmError::Network(n) => network_code(n),
        VmError::Helper(h) => helper_code(h),
        VmError::Forward(f) => forward_code(f),
        VmError::Secret(e) => secret_code(e),
    }
}

fn secret_code(e: &SecretError) -> ErrorCode {
    match e {
        SecretError::Invalid(_) => ErrorCode::InvalidParams,
        SecretError::NotFound(_) => ErrorCode::NotFound,
        SecretError::Conflict(_) => ErrorCode::Conflict,
        SecretError::Keyring(_) => ErrorCode::Unavailable,
        SecretError::Io { .. } => ErrorCode::Internal,
        SecretError::Store(s) => store_code(s),
    }
}

fn workspace_code(e: &WorkspaceError) -> ErrorCode {
    match e {
        WorkspaceError::Invalid(_) => ErrorCode::InvalidParams,
        WorkspaceError::NotFound(_) => ErrorCode::NotFound,
        WorkspaceError::Conflict(_) => ErrorCode::Conflict,
        WorkspaceError::Agent(_) => ErrorCode::Unavailable,
        WorkspaceError::Guest(_) | WorkspaceError::Host(_) | WorkspaceError::Task(_) => {
            ErrorCode::Internal
        }
        WorkspaceError::Cancelled(_) => ErrorCode::Cancelled,
        WorkspaceError::Vm(v) => vm_code(v),
        WorkspaceError::Store(s) => store_code(s),
    }
}

fn session_code(e: &SessionError) -> ErrorCode {
    match e {
        SessionError::Invalid(_) => ErrorCode::InvalidParams,
        SessionError::NotHeld(_) => ErrorCode::NotFound,
        SessionError::Conflict(_) => ErrorCode::Conflict,
    }
}

macro_rules! to_wire {
    ($($ty:ty => $code:path),+ $(,)?) => {
        $(impl From<$ty> for RpcError {
            fn from(e: $ty) -> RpcError {
                wire($code(&e), &e)
            }
        })+
    };
}

to_wire! {
    HelperError => helper_code,
    NetworkError => network_code,
    ForwardError => forward_code,
    ImageError => image_code,
    VmError => vm_code,
    WorkspaceError => workspace_code,
    SessionError => session_code,
    SecretError => secret_code,
}

impl From<CancelError> for RpcError {
    fn from(e: CancelError) -> RpcError {
        let code = match &e {
            CancelError::NoSuch(_) => ErrorCode::NotFound,
            CancelError::NotCancellable(..) => ErrorCode::Conflict,
        };
        wire(code, &e)
    }
}

impl From<NoSuchOperation> for RpcError {
    fn from(e: NoSuchOperation) -> RpcError {
        wire(ErrorCode::NotFound, &e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_errors_keep_the_code_of_what_went_wrong() {
        let code = |e: VmError| RpcError::from(e).code;
        // Wrapped errors keep their own code, however deep.
        assert_eq!(
            code(VmError::Image(ImageError::NotFound("no image".into()))),
            ErrorCode::NotFound
        );
        let refused = HelperError::Refused {
            code: ErrorCode::PermissionDenied,
            message: "not under a state dir".into(),
        };
        let e = RpcError::from(VmError::Network(NetworkError::Helper(refused)));
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert_eq!(e.message, "banger-helper: not under a state dir");
        // A disk another VMM holds is a conflict; other launch failures are not.
        let launch = |source| VmError::Launch {
            name: "box".into(),
            source,
        };
        let in_use = banger_vmm::VmmError::DiskInUse {
            path: "/s/vms/a/root.ext4".into(),
        };
        let e = RpcError::from(launch(in_use));
        assert_eq!(e.code, ErrorCode::Conflict);
        assert!(
            e.message
                .starts_with("cannot start VM \"box\": /s/vms/a/root.ext4 is in use"),
            "{}",
            e.message
        );
        let io = banger_vmm::VmmError::Io(std::io::Error::other("boom"));
        assert_eq!(code(launch(io)), ErrorCode::Internal);
        assert_eq!(
            RpcError::from(ForwardError::Taken("port".into())).code,
            ErrorCode::Conflict
        );
    }
}
