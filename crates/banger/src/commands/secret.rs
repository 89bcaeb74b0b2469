//! `banger secret set|list|rm`.

use std::io::{IsTerminal, Read};
use std::path::Path;

use banger_wire::methods::*;
use banger_wire::{Empty, NoParams};

use crate::context::Invocation;
use crate::error::CliError;
use crate::out::outln;

/// The value as given: a file's or standard input's bytes, without the one
/// line break an editor or `echo` ends them with (a value never holds one).
pub fn read_value(mut input: impl Read) -> Result<String, String> {
    let mut bytes = Vec::new();
    input
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the value: {e}"))?;
    let mut value = String::from_utf8(bytes).map_err(|_| "the value is not UTF-8".to_owned())?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err("the value is empty".into());
    }
    Ok(value)
}

pub async fn set(ctx: &Invocation, name: String, file: Option<&Path>) -> Result<u8, CliError> {
    let value = match file {
        Some(path) => std::fs::File::open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))
            .and_then(read_value),
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("value of {name} (then Enter and Ctrl-D):");
            }
            read_value(std::io::stdin().lock())
        }
    }
    .map_err(|e| CliError::local(&ctx.op_id, format!("secret {name}: {e}")))?;
    let info = ctx
        .call::<SecretSet>(&SecretSetParams { name, value })
        .await?;
    if ctx.json {
        super::print_json(&info)?;
    } else {
        outln!("stored secret {} ({})", info.name, info.store);
    }
    Ok(0)
}

pub async fn list(ctx: &Invocation) -> Result<u8, CliError> {
    let all = ctx.call::<SecretList>(&NoParams {}).await?;
    if ctx.json {
        super::print_json(&all)?;
        return Ok(0);
    }
    outln!("{:<32} {:<23} {:<8} USED BY", "NAME", "SET", "STORE");
    for s in &all {
        outln!(
            "{:<32} {:<23} {:<8} {}",
            s.name,
            super::snapshot::created(s.created_at_ms),
            s.store,
            if s.used_by.is_empty() {
                "-".to_owned()
            } else {
                s.used_by.join(",")
            }
        );
    }
    Ok(0)
}

pub async fn rm(ctx: &Invocation, name: String) -> Result<u8, CliError> {
    let Empty {} = ctx
        .call::<SecretRm>(&SecretName { name: name.clone() })
        .await?;
    if !ctx.json {
        outln!("removed secret {name}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_lose_one_trailing_line_break() {
        assert_eq!(read_value(&b"s3cret\n"[..]).unwrap(), "s3cret");
        assert_eq!(read_value(&b"s3cret\r\n"[..]).unwrap(), "s3cret");
        assert_eq!(read_value(&b"s3cret"[..]).unwrap(), "s3cret");
        assert!(read_value(&b"\n"[..]).is_err());
        assert!(read_value(&b""[..]).is_err());
        assert!(read_value(&[0xff, 0xfe][..]).is_err());
    }
}
