//! A small, strict reader of the Swagger 2.0 subset that Firecracker's
//! `firecracker-api.yaml` uses, and a validator of JSON bodies against it.
//!
//! Loading refuses any schema keyword the validator does not understand
//! (every schema, parameter and operation object is read with
//! `deny_unknown_fields`), so a future spec that starts using, say,
//! `pattern` or `allOf` fails loudly instead of being half-checked.
//!
//! Checked: `$ref` (resolved at load time), `type` (`integer` is a JSON
//! number without a fraction or exponent, `number` is any JSON number),
//! `required`, `properties`, `additionalProperties` (absent means unknown
//! fields are refused, as Firecracker's `deny_unknown_fields` does),
//! `items`, `enum`, `minimum`, `maximum`, and `format: int32/int64` ranges.
//! Documentation-only keywords (`description`, `default`, `example`,
//! `readOnly`) are accepted and ignored, as is `format` on strings (the spec
//! puts a regular expression there for the MMDS address).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// The parts of the spec the double uses.
#[derive(Debug, Deserialize)]
pub struct Spec {
    swagger: String,
    info: Info,
    paths: BTreeMap<String, PathItem>,
    definitions: BTreeMap<String, Schema>,
}

#[derive(Debug, Deserialize)]
struct Info {
    version: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathItem {
    get: Option<Operation>,
    put: Option<Operation>,
    patch: Option<Operation>,
    post: Option<Operation>,
    delete: Option<Operation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    parameters: Vec<Parameter>,
    #[serde(default, rename = "summary")]
    _summary: IgnoredAny,
    #[serde(default, rename = "description")]
    _description: IgnoredAny,
    #[serde(default, rename = "operationId")]
    _operation_id: IgnoredAny,
    #[serde(default, rename = "responses")]
    _responses: IgnoredAny,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Location {
    Path,
    Body,
    Query,
    Header,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Parameter {
    name: String,
    #[serde(rename = "in")]
    location: Location,
    #[serde(default)]
    required: bool,
    schema: Option<Schema>,
    #[serde(rename = "type")]
    ty: Option<Type>,
    #[serde(default, rename = "description")]
    _description: IgnoredAny,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Type {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Object => "object",
            Type::Array => "array",
            Type::String => "string",
            Type::Integer => "integer",
            Type::Number => "number",
            Type::Boolean => "boolean",
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Additional {
    Allowed(bool),
    Schema(Box<Schema>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Schema {
    #[serde(rename = "$ref")]
    reference: Option<String>,
    #[serde(rename = "type")]
    ty: Option<Type>,
    #[serde(default)]
    required: Vec<String>,
    #[serde(default)]
    properties: BTreeMap<String, Schema>,
    items: Option<Box<Schema>>,
    #[serde(rename = "enum")]
    enumeration: Option<Vec<Value>>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    format: Option<String>,
    #[serde(rename = "additionalProperties")]
    additional: Option<Additional>,
    #[serde(default, rename = "description")]
    _description: IgnoredAny,
    #[serde(default, rename = "default")]
    _default: IgnoredAny,
    #[serde(default, rename = "example")]
    _example: IgnoredAny,
    #[serde(default, rename = "readOnly")]
    _read_only: IgnoredAny,
}

/// A request matched to an operation of the spec.
#[derive(Debug)]
pub struct Route<'a> {
    /// The path template, e.g. `/drives/{drive_id}`.
    pub template: &'a str,
    /// Path parameters by name, e.g. `drive_id` → `rootfs`.
    pub params: Vec<(String, String)>,
    operation: &'a Operation,
}

/// The body rules of an operation.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyRule<'a> {
    /// The operation takes no body.
    None,
    /// A body validated against the definition `name` (`inline schema` when
    /// the spec inlines it); `required` is the parameter's own flag.
    Schema { required: bool, name: &'a str },
}

/// Why a JSON body does not match its schema. `field` is a dotted path from
/// the body's root (`rate_limiter.bandwidth.size`, `drives[0]`), empty for
/// the root itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl Spec {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the Firecracker API spec {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(yaml: &str) -> anyhow::Result<Self> {
        let spec: Spec = serde_norway::from_str(yaml)
            .context("not a Swagger document of the subset fc-double understands")?;
        if spec.swagger != "2.0" {
            bail!("expected swagger: \"2.0\", found {:?}", spec.swagger);
        }
        spec.check_refs()?;
        Ok(spec)
    }

    /// `info.version`, e.g. `1.17.0-dev`.
    pub fn version(&self) -> &str {
        &self.info.version
    }

    /// Every `$ref` must name a definition.
    fn check_refs(&self) -> anyhow::Result<()> {
        fn walk(spec: &Spec, schema: &Schema, at: &str) -> anyhow::Result<()> {
            if let Some(r) = &schema.reference {
                spec.resolve(r).with_context(|| format!("at {at}"))?;
            }
            for (name, prop) in &schema.properties {
                walk(spec, prop, &format!("{at}.{name}"))?;
            }
            if let Some(items) = &schema.items {
                walk(spec, items, &format!("{at}[]"))?;
            }
            if let Some(Additional::Schema(s)) = &schema.additional {
                walk(spec, s, &format!("{at}.*"))?;
            }
            Ok(())
        }
        for (name, schema) in &self.definitions {
            walk(self, schema, &format!("definitions.{name}"))?;
        }
        for (template, item) in &self.paths {
            for (method, op) in item.operations() {
                for p in &op.parameters {
                    if let Some(s) = &p.schema {
                        walk(self, s, &format!("{method} {template} {}", p.name))?;
                    }
                    match p.location {
                        Location::Body if p.schema.is_none() => {
                            bail!("{method} {template}: body parameter without a schema")
                        }
                        Location::Body => {}
                        Location::Path if p.ty == Some(Type::String) => {}
                        Location::Path => bail!(
                            "{method} {template}: path parameter {} is not a string",
                            p.name
                        ),
                        Location::Query | Location::Header => bail!(
                            "{method} {template}: {:?} parameters are not supported",
                            p.location
                        ),
                    }
                }
            }
        }
        Ok(())
    }

    fn resolve(&self, reference: &str) -> anyhow::Result<&Schema> {
        let Some(name) = reference.strip_prefix("#/definitions/") else {
            bail!("unsupported $ref {reference:?} (only #/definitions/NAME)");
        };
        self.definitions
            .get(name)
            .with_context(|| format!("$ref to missing definition {name:?}"))
    }

    /// Finds the operation for `method` (upper case) on `path`.
    pub fn route(&self, method: &str, path: &str) -> Option<Route<'_>> {
        let segments: Vec<&str> = split_path(path);
        for (template, item) in &self.paths {
            let Some(op) = item.operation(method) else {
                continue;
            };
            let parts = split_path(template);
            if parts.len() != segments.len() {
                continue;
            }
            let mut params = Vec::new();
            let matched = parts.iter().zip(&segments).all(|(part, seg)| {
                match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) => {
                        params.push((name.to_owned(), (*seg).to_owned()));
                        true
                    }
                    None => part == seg,
                }
            });
            if matched {
                return Some(Route {
                    template,
                    params,
                    operation: op,
                });
            }
        }
        None
    }

    /// The body rule of a routed operation.
    pub fn body_rule<'a>(&'a self, route: &Route<'a>) -> BodyRule<'a> {
        match route.body_parameter() {
            None => BodyRule::None,
            Some(p) => BodyRule::Schema {
                required: p.required,
                name: p
                    .schema
                    .as_ref()
                    .and_then(|s| s.reference.as_deref())
                    .and_then(|r| r.strip_prefix("#/definitions/"))
                    .unwrap_or("inline schema"),
            },
        }
    }

    /// Validates a body against the operation's body schema.
    pub fn validate_body(&self, route: &Route<'_>, body: &Value) -> Result<(), Violation> {
        match route.body_parameter().and_then(|p| p.schema.as_ref()) {
            Some(schema) => self.check(schema, body, ""),
            None => Err(Violation {
                field: String::new(),
                message: "this operation takes no body".into(),
            }),
        }
    }

    /// Validates `value` against `definitions.<name>`.
    #[cfg(test)]
    pub fn validate_definition(&self, name: &str, value: &Value) -> Result<(), Violation> {
        let schema = self.definitions.get(name).expect("known definition");
        self.check(schema, value, "")
    }

    fn check(&self, schema: &Schema, value: &Value, at: &str) -> Result<(), Violation> {
        let fail = |message: String| {
            Err(Violation {
                field: at.to_owned(),
                message,
            })
        };
        if let Some(r) = &schema.reference {
            let target = self.resolve(r).expect("refs were checked at load time");
            return self.check(target, value, at);
        }
        let ty = schema
            .ty
            .or_else(|| (!schema.properties.is_empty()).then_some(Type::Object));
        if let Some(ty) = ty
            && !has_type(value, ty)
        {
            return fail(format!("invalid type: {}, expected {ty}", describe(value)));
        }
        if let Some(allowed) = &schema.enumeration
            && !allowed.contains(value)
        {
            let list = allowed
                .iter()
                .map(|v| match v {
                    Value::String(s) => format!("`{s}`"),
                    other => format!("`{other}`"),
                })
                .collect::<Vec<_>>()
                .join(", ");
            return fail(format!(
                "unknown variant {}, expected one of {list}",
                describe(value)
            ));
        }
        if let Value::Number(n) = value {
            if let Some(range) = schema.format.as_deref().and_then(int_format_range)
                && !n.as_i64().is_some_and(|i| range.contains(&i))
            {
                return fail(format!(
                    "{n} is out of range for {}",
                    schema.format.as_deref().unwrap_or_default()
                ));
            }
            let x = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = schema.minimum
                && x < min
            {
                return fail(format!("{n} is below the minimum {min}"));
            }
            if let Some(max) = schema.maximum
                && x > max
            {
                return fail(format!("{n} is above the maximum {max}"));
            }
        }
        match value {
            Value::Object(map) => {
                for name in &schema.required {
                    if !map.contains_key(name) {
                        return fail(format!("missing field `{name}`"));
                    }
                }
                for (key, v) in map {
                    let child = join(at, key);
                    match (schema.properties.get(key), &schema.additional) {
                        (Some(prop), _) => self.check(prop, v, &child)?,
                        (None, Some(Additional::Allowed(true))) => {}
                        (None, Some(Additional::Schema(s))) => self.check(s, v, &child)?,
                        (None, None | Some(Additional::Allowed(false))) => {
                            let expected = schema
                                .properties
                                .keys()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(", ");
                            return fail(if expected.is_empty() {
                                format!("unknown field `{key}`, there are no fields")
                            } else {
                                format!("unknown field `{key}`, expected one of {expected}")
                            });
                        }
                    }
                }
            }
            Value::Array(items) => {
                if let Some(item_schema) = &schema.items {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &format!("{at}[{i}]"))?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl PathItem {
    fn operation(&self, method: &str) -> Option<&Operation> {
        match method {
            "GET" => self.get.as_ref(),
            "PUT" => self.put.as_ref(),
            "PATCH" => self.patch.as_ref(),
            "POST" => self.post.as_ref(),
            "DELETE" => self.delete.as_ref(),
            _ => None,
        }
    }

    fn operations(&self) -> impl Iterator<Item = (&'static str, &Operation)> {
        [
            ("GET", &self.get),
            ("PUT", &self.put),
            ("PATCH", &self.patch),
            ("POST", &self.post),
            ("DELETE", &self.delete),
        ]
        .into_iter()
        .filter_map(|(m, op)| op.as_ref().map(|op| (m, op)))
    }
}

impl<'a> Route<'a> {
    fn body_parameter(&self) -> Option<&'a Parameter> {
        self.operation
            .parameters
            .iter()
            .find(|p| p.location == Location::Body)
    }
}

fn split_path(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn has_type(value: &Value, ty: Type) -> bool {
    match (ty, value) {
        (Type::Object, Value::Object(_))
        | (Type::Array, Value::Array(_))
        | (Type::String, Value::String(_))
        | (Type::Boolean, Value::Bool(_))
        | (Type::Number, Value::Number(_)) => true,
        (Type::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

fn int_format_range(format: &str) -> Option<std::ops::RangeInclusive<i64>> {
    match format {
        "int32" => Some(i64::from(i32::MIN)..=i64::from(i32::MAX)),
        "int64" => Some(i64::MIN..=i64::MAX),
        _ => None,
    }
}

/// serde-style description of a JSON value for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_i64() || n.is_u64() => format!("integer `{n}`"),
        Value::Number(n) => format!("floating point `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec() -> Spec {
        let path = crate::locate::find_spec(None).expect("the shared Firecracker spec");
        Spec::load(&path).unwrap()
    }

    fn violation(spec: &Spec, def: &str, value: Value) -> String {
        spec.validate_definition(def, &value)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn the_real_spec_loads_and_routes() {
        let spec = spec();
        assert!(spec.version().starts_with("1."));
        let r = spec.route("PUT", "/drives/rootfs").unwrap();
        assert_eq!(r.template, "/drives/{drive_id}");
        assert_eq!(r.params, vec![("drive_id".into(), "rootfs".into())]);
        assert_eq!(
            spec.body_rule(&r),
            BodyRule::Schema {
                required: true,
                name: "Drive"
            }
        );
        // The spec does not mark the machine-config body as required.
        let r = spec.route("PUT", "/machine-config").unwrap();
        assert_eq!(
            spec.body_rule(&r),
            BodyRule::Schema {
                required: false,
                name: "MachineConfiguration"
            }
        );
        assert_eq!(
            spec.body_rule(&spec.route("GET", "/").unwrap()),
            BodyRule::None
        );
        assert!(spec.route("DELETE", "/drives/rootfs").is_none());
        assert!(spec.route("PUT", "/drives").is_none());
        assert!(spec.route("PUT", "/nonsense").is_none());
    }

    #[test]
    fn boot_source() {
        let spec = spec();
        spec.validate_definition(
            "BootSource",
            &json!({"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "quiet"}),
        )
        .unwrap();
        assert_eq!(
            violation(&spec, "BootSource", json!({"boot_args": "quiet"})),
            "missing field `kernel_image_path`"
        );
        assert_eq!(
            violation(&spec, "BootSource", json!({"kernel_image_path": 5})),
            "kernel_image_path: invalid type: integer `5`, expected string"
        );
        let unknown = violation(
            &spec,
            "BootSource",
            json!({"kernel_image_path": "/k", "kernel": "/k"}),
        );
        assert!(
            unknown.starts_with("unknown field `kernel`, expected one of"),
            "{unknown}"
        );
        assert!(unknown.contains("`initrd_path`"), "{unknown}");
    }

    #[test]
    fn machine_configuration_integers_ranges_and_nested_enum_ref() {
        let spec = spec();
        spec.validate_definition(
            "MachineConfiguration",
            &json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false,
                    "cpu_template": "None", "huge_pages": "2M"}),
        )
        .unwrap();
        assert_eq!(
            violation(
                &spec,
                "MachineConfiguration",
                json!({"vcpu_count": 2.5, "mem_size_mib": 1024})
            ),
            "vcpu_count: invalid type: floating point `2.5`, expected integer"
        );
        assert_eq!(
            violation(
                &spec,
                "MachineConfiguration",
                json!({"vcpu_count": 33, "mem_size_mib": 1024})
            ),
            "vcpu_count: 33 is above the maximum 32"
        );
        assert_eq!(
            violation(
                &spec,
                "MachineConfiguration",
                json!({"vcpu_count": 1, "mem_size_mib": 1024, "cpu_template": "T3"})
            ),
            "cpu_template: unknown variant string \"T3\", expected one of `C3`, `T2`, `T2S`, \
             `T2CL`, `T2A`, `V1N1`, `None`"
        );
    }

    #[test]
    fn drive_with_nested_rate_limiter() {
        let spec = spec();
        let ok = json!({"drive_id": "rootfs", "is_root_device": true, "path_on_host": "/r",
                        "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}});
        spec.validate_definition("Drive", &ok).unwrap();
        assert_eq!(
            violation(
                &spec,
                "Drive",
                json!({"drive_id": "r", "is_root_device": true,
                       "rate_limiter": {"ops": {"size": 10}}})
            ),
            "rate_limiter.ops: missing field `refill_time`"
        );
        assert_eq!(
            violation(
                &spec,
                "Drive",
                json!({"drive_id": "r", "is_root_device": true,
                       "rate_limiter": {"ops": {"size": -1, "refill_time": 1}}})
            ),
            "rate_limiter.ops.size: -1 is below the minimum 0"
        );
        assert_eq!(
            violation(
                &spec,
                "Drive",
                json!({"drive_id": "r", "is_root_device": "yes"})
            ),
            "is_root_device: invalid type: string \"yes\", expected boolean"
        );
    }

    #[test]
    fn additional_properties_and_arrays() {
        let spec = spec();
        // Metrics.properties maps names to strings.
        spec.validate_definition(
            "Metrics",
            &json!({"metrics_path": "/m", "properties": {"vm": "a"}}),
        )
        .unwrap();
        assert_eq!(
            violation(
                &spec,
                "Metrics",
                json!({"metrics_path": "/m", "properties": {"vm": 1}})
            ),
            "properties.vm: invalid type: integer `1`, expected string"
        );
        // MmdsContentsObject takes anything.
        spec.validate_definition("MmdsContentsObject", &json!({"any": {"thing": [1]}}))
            .unwrap();
        // Arrays of $ref objects.
        assert_eq!(
            violation(
                &spec,
                "SnapshotLoadParams",
                json!({"snapshot_path": "/s",
                       "network_overrides": [{"iface_id": "eth0", "host_dev_name": "t"},
                                             {"iface_id": "eth1"}]})
            ),
            "network_overrides[1]: missing field `host_dev_name`"
        );
        // int32 format.
        assert_eq!(
            violation(
                &spec,
                "VcpuFeatures",
                json!({"index": 4_294_967_296_u64, "bitmap": "0b1"})
            ),
            "index: 4294967296 is out of range for int32"
        );
    }

    #[test]
    fn vsock_minimum_cid_and_action_enum() {
        let spec = spec();
        assert_eq!(
            violation(&spec, "Vsock", json!({"guest_cid": 2, "uds_path": "/v"})),
            "guest_cid: 2 is below the minimum 3"
        );
        assert_eq!(
            violation(
                &spec,
                "InstanceActionInfo",
                json!({"action_type": "Reboot"})
            ),
            "action_type: unknown variant string \"Reboot\", expected one of \
             `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`"
        );
        assert_eq!(
            violation(&spec, "InstanceActionInfo", json!([])),
            "invalid type: sequence, expected object"
        );
    }

    #[test]
    fn unknown_keywords_and_dangling_refs_are_refused_at_load() {
        let base = "swagger: \"2.0\"\ninfo: {version: \"1\"}\npaths: {}\ndefinitions:\n";
        let err = Spec::parse(&format!(
            "{base}  A:\n    type: string\n    pattern: \"^a$\"\n"
        ))
        .unwrap_err();
        assert!(format!("{err:#}").contains("pattern"), "{err:#}");
        let err = Spec::parse(&format!(
            "{base}  A:\n    type: object\n    properties:\n      b:\n        $ref: \"#/definitions/B\"\n"
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("missing definition \"B\""),
            "{err:#}"
        );
    }
}
