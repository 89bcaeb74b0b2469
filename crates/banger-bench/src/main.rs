//! `banger-bench`: prints figures, asserts nothing (run `scripts/bench.sh`).
//!
//! 1. Boot ratio: the default image booted to agent-ready by a bare QEMU
//!    command (no daemon, no network, one overlay disk) versus the wall time
//!    of `banger vm run -- true`, both in this run, as `(b)/(a)`; plus the
//!    stages of one `banger vm create`.
//! 2. Daemon-side create overhead: 20 `vm.create` calls against fc-double
//!    (a Firecracker stand-in that starts in milliseconds) and 20 restores
//!    of one snapshot of an fc-double VM: wall time, each stage, and the
//!    daemon's share (the stages but the stand-in's own), p50 and p99.
//! 3. Pulled layers to ext4: the default image's tree as two gzip layers,
//!    applied by banger-oci (digest verified, whiteout/escape rules) and made
//!    into `rootfs.ext4`, versus GNU `tar -x` of the same layers plus the
//!    same `mkfs.ext4 -d`, both in this run, as a ratio.
//! 4. Workspaces: `banger workspace prepare` of a generated repository
//!    (`BENCH_WS_FILES` files, `BENCH_WS_MIB` MiB; default 50,000 / 1024)
//!    versus `tar -c | banger vm ssh VM tar -x` of the same directory into
//!    the same VM, as a ratio; then an export of 1,000 files changed in
//!    the guest as a patch, as a branch and applied to the host's tree.
//! 5. Snapshots, forks and the warm pool (`snapshot`, `fork`, `pool`):
//!    medians of at least 5 runs (`BENCH_RUNS` raises it).
//! 6. Network (`net`), against servers in an "outside" namespace:
//!    - policy cost: TCP throughput from a guest to a sink outside
//!      (`BENCH_NET_MIB` MiB a run, default 512: shorter runs vary by a quarter under TCG; median of at least 7) for
//!      a VM under `nat` (no policy) versus one under an `allow=` list of
//!      100 entries, the one it uses last, interleaved, as a ratio;
//!    - secrets proxy: HTTPS request latency to a server with its own CA
//!      (given as `[secrets] upstream_ca`), through the secrets proxy (a VM
//!      with `--secret TOKEN@api.test`) versus direct (a VM without),
//!      `BENCH_HTTPS_REQUESTS` requests each (default 200), p50 and p99 of
//!      curl's `time_total`.
//! 7. The web API: `GET /api/vms` with 100 VMs (fc-double) against
//!    `banger vm list --json` of the same VMs, p50 and p99, as a ratio.
//!
//! Needs root (it creates a network namespace for the VMs) and the
//! workspace's binaries built next to it. Arguments name the sections to
//! run (`boot`, `snapshot`, `fork`, `pool`, `fc`, `layers`, `workspace`,
//! `net`, `web`); none runs them all.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use banger_agent_proto::AgentClient;
use banger_host::Accel;
use banger_vmm::qemu::{Machine, Qemu};
use banger_vmm::{DiskFormat, DiskSpec, LaunchSpec};

fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .expect("exe")
        .parent()
        .expect("dir")
        .to_path_buf()
}

struct Env {
    home: PathBuf,
    netns: String,
}

impl Env {
    fn banger(&self, in_netns: bool, args: &[&str]) -> Command {
        let banger = bin_dir().join("banger");
        let mut c = if in_netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.netns]).arg(&banger);
            c
        } else {
            Command::new(&banger)
        };
        c.args(args)
            .env("BANGER_HOME", &self.home)
            .env("NO_COLOR", "1");
        c
    }

    fn ok(&self, in_netns: bool, args: &[&str]) -> anyhow::Result<String> {
        let out = self.banger(in_netns, args).output()?;
        if !out.status.success() {
            bail!("banger {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn stop_daemon(&self) {
        let _ = self.banger(false, &["daemon", "stop"]).output();
        let lock = self.home.join("run/helper.lock");
        if let Ok(pid) = std::fs::read_to_string(&lock) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // VMs outlive a daemon stop: delete any a failed section left.
        if let Ok(list) = self.ok(true, &["vm", "list", "--json"])
            && let Ok(vms) = serde_json::from_str::<Vec<serde_json::Value>>(&list)
        {
            for vm in vms.iter().filter_map(|v| v["name"].as_str()) {
                let _ = self.banger(true, &["vm", "delete", "--force", vm]).output();
            }
        }
        let _ = self.banger(true, &["daemon", "stop"]).output();
        self.stop_daemon();
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Boot the image with QEMU alone and time launch → agent handshake.
async fn bare_boot(image_dir: &Path, scratch: &Path, machine: Machine) -> anyhow::Result<f64> {
    let dir = scratch.join(format!("bare-{:04x}", fastrand::u16(..)));
    std::fs::create_dir_all(&dir)?;
    // Overlays of the root and of the work seed (which the initramfs
    // mounts on /root), as a VM has them.
    let mut disks = Vec::new();
    for (base, name) in [
        ("rootfs.ext4", "root.qcow2"),
        ("work-seed.ext4", "work.qcow2"),
    ] {
        let overlay = dir.join(name);
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image_dir.join(base))
            .arg(&overlay)
            .status()?;
        if !st.success() {
            bail!("qemu-img failed");
        }
        disks.push(DiskSpec {
            path: overlay,
            format: DiskFormat::Qcow2,
            read_only: false,
        });
    }
    let accel = banger_host::effective_accel(Default::default(), &banger_host::kvm_status())?;
    let mut cmdline =
        "console=ttyS0 root=LABEL=rootfs rw quiet panic=-1 banger.init=fast banger.channel=serial"
            .to_string();
    if accel == Accel::Tcg
        && let Some(khz) = banger_host::tsc_khz()
    {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let spec = LaunchSpec {
        id: "bench".into(),
        name: "bench".into(),
        dir: dir.clone(),
        vcpus: 2,
        memory_mib: 1024,
        accel,
        kernel: image_dir.join("vmlinux"),
        initrd: Some(image_dir.join("initrd.img")),
        cmdline,
        disks,
        net: None,
        vsock_cid: None,
        incoming: false,
        // QEMU's own RAM: the bare command line banger's is measured against.
        memory: banger_vmm::GuestMemory::Default,
    };
    let qemu = Qemu {
        bin: banger_host::find_binary("qemu-system-x86_64").context("qemu-system-x86_64")?,
        machine,
    };
    let t = Instant::now();
    let (h, _media) = qemu.launch(&spec).await?;
    let agent = async {
        loop {
            if let Ok(s) = banger_vmm::connect_agent(&h.agent, Duration::from_secs(5)).await
                && let Ok(c) = AgentClient::handshake(s, Duration::from_secs(120)).await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let client = tokio::time::timeout(Duration::from_secs(180), agent)
        .await
        .context("agent never answered")?;
    let secs = t.elapsed().as_secs_f64();
    drop(client);
    banger_vmm::stop(&h, Duration::from_secs(5)).await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(secs)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Sections to run (all by default): re-measure one without the rest.
    const SECTIONS: [&str; 9] = [
        "boot",
        "snapshot",
        "fork",
        "pool",
        "fc",
        "layers",
        "workspace",
        "net",
        "web",
    ];
    let only: Vec<String> = std::env::args().skip(1).collect();
    if let Some(bad) = only.iter().find(|a| !SECTIONS.contains(&a.as_str())) {
        bail!(
            "unknown section {bad:?}: the sections are {}",
            SECTIONS.join(", ")
        );
    }
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scratch = tempfile::Builder::new()
        .prefix("bgbench")
        .tempdir_in("/var/tmp")?;
    let env = Env {
        home: scratch.path().join("home"),
        netns: format!("bgbench-{:06x}", fastrand::u32(..) & 0xffffff),
    };
    // No warm pool but in the pool section: the image build runs outside
    // the namespace, and pooled guests would load the other figures.
    std::fs::create_dir_all(&env.home)?;
    std::fs::write(env.home.join("config.toml"), "[pool]\nsize = 0\n")?;
    let st = Command::new("ip")
        .args(["netns", "add", &env.netns])
        .status()?;
    if !st.success() {
        bail!("ip netns add failed: the benchmark needs root");
    }
    Command::new("ip")
        .args(["-n", &env.netns, "link", "set", "lo", "up"])
        .status()?;

    eprintln!("building the default image (outside the namespace: it needs the Debian archive)…");
    let t = Instant::now();
    env.ok(false, &["image", "build", "-q"])?;
    let build_s = t.elapsed().as_secs_f64();
    let images: serde_json::Value =
        serde_json::from_str(&env.ok(false, &["image", "list", "--json"])?)?;
    let image_dir = PathBuf::from(images[0]["dir"].as_str().context("image dir")?);
    let size_mib = images[0]["disk_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0;
    env.stop_daemon();

    println!(
        "accelerator: {}",
        banger_host::effective_accel(Default::default(), &banger_host::kvm_status())?
    );
    println!("default image: built in {build_s:.1}s, {size_mib:.0} MiB on disk");
    if want("boot") {
        let mut bare = Vec::new();
        let mut bare_q35 = Vec::new();
        let mut banger = Vec::new();
        for i in 0..runs {
            bare.push(bare_boot(&image_dir, scratch.path(), Machine::Microvm).await?);
            bare_q35.push(bare_boot(&image_dir, scratch.path(), Machine::Q35).await?);
            let t = Instant::now();
            env.ok(true, &["vm", "run", "-q", "--", "true"])?;
            banger.push(t.elapsed().as_secs_f64());
            eprintln!(
                "run {}: bare microvm {:.2}s, bare q35 {:.2}s, banger vm run {:.2}s",
                i + 1,
                bare[i],
                bare_q35[i],
                banger[i]
            );
        }
        let (a, b) = (median(&mut bare), median(&mut banger));
        let q35 = median(&mut bare_q35);

        let events = env.ok(true, &["vm", "create", "--name", "stages", "--json"])?;
        let stages = done_stages(&events)?;
        env.ok(true, &["vm", "delete", "--force", "stages"])?;

        println!("boot to agent-ready, median of {runs}:");
        println!(
            "  (a) bare QEMU command line      {a:>7.2}s   (microvm, banger's default machine)"
        );
        println!(
            "  (b) banger vm run -- true        {b:>7.2}s   (includes create, exec and delete)"
        );
        println!(
            "  ratio (b)/(a)                    {:>7.3}   (goal <= 1.05)",
            b / a
        );
        println!(
            "  bare QEMU, q35 machine            {q35:>7.2}s   (q35/microvm {:.3})",
            q35 / a
        );
        println!("banger vm create stages:");
        for (s, ms) in &stages {
            println!("  {s:<12} {:>7.2}s", *ms as f64 / 1000.0);
        }
    }
    // Restores vary more than boots under TCG: medians of at least five.
    let restore_runs = runs.max(5);
    if want("snapshot") {
        let runs = restore_runs;
        let f = snapshot_figures(&env, runs)?;
        println!("snapshot and restore (QEMU), median of {runs}, same run:");
        println!(
            "  vm snapshot of a running {} MiB guest   {:>7.2}s   ({:.0} MiB on disk; guest memory in use {:.0} MiB)",
            f.guest_mib, f.snapshot_s, f.snapshot_mib, f.guest_used_mib
        );
        println!("  (a) cold vm run -- true            {:>7.2}s", f.cold_s);
        println!("  (b) vm run --from SNAP -- true     {:>7.2}s", f.restore_s);
        println!(
            "  ratio (b)/(a)                      {:>7.3}",
            f.restore_s / f.cold_s
        );
        println!("vm create --from stages:");
        for (s, ms) in &f.stages {
            println!("  {s:<14} {:>7.2}s", *ms as f64 / 1000.0);
        }
    }
    if want("fork") {
        let runs = restore_runs;
        let f = fork_figures(&env, runs)?;
        println!("vm fork (QEMU), median of {runs}:");
        println!("  vm fork VM, then vm exec -- true      {:>7.2}s", f.one_s);
        println!("  vm fork VM --count 4, then 4 execs    {:>7.2}s", f.four_s);
        println!(
            "host memory of idle VMs (QEMU processes' RSS and PSS; TCG's translation cache included):"
        );
        println!(
            "  the booted source                     RSS {:>6.0} MiB  PSS {:>6.0} MiB, file pages {:>4.0}   (guest uses {:.0} MiB; goal RSS <= that + 32)",
            f.source_rss_mib, f.source_pss_mib, f.source_file_mib, f.guest_used_mib
        );
        println!(
            "    of its RSS: guest RAM {:.0} MiB, TCG's translations {:.0} MiB (none under KVM), QEMU's own {:.0} MiB",
            f.source_ram_mib,
            f.source_tcg_mib,
            f.source_rss_mib - f.source_ram_mib - f.source_tcg_mib
        );
        for (count, rss, pss, file, total) in &f.density {
            println!(
                "  {count} fork{:<2} per VM                    RSS {rss:>6.0} MiB  PSS {pss:>6.0} MiB, file pages {file:>4.0}   (all: PSS {total:>5.0} MiB = {:.2}x the source's RSS)",
                if *count == 1 { "" } else { "s" },
                total / f.source_rss_mib
            );
        }
    }
    if want("pool") {
        let runs = restore_runs;
        let (cold, pooled) = pool_figures(&env, runs)?;
        println!("warm pool (QEMU, [pool] size = 1), median of {runs}, same run:");
        println!("  (a) cold vm run -- true               {cold:>7.2}s");
        println!("  (b) vm run -- true from the pool      {pooled:>7.2}s");
        println!(
            "  ratio (b)/(a)                         {:>7.3}",
            pooled / cold
        );
    }
    if want("fc") || want("web") {
        fc_double_setup(&env, scratch.path())?;
    }
    if want("fc") {
        // Daemon-side create and restore overhead, against the Firecracker
        // stand-in.
        fc_creates(&env)?.print("creates of an fc-double VM", "vm create", 50.0);
        fc_restores(&env)?.print(
            "restores of one snapshot of an fc-double VM",
            "vm create --from",
            20.0,
        );
    }
    if want("web") {
        let w = web_figures(&env)?;
        println!(
            "listing {} VMs (fc-double), {} calls each, milliseconds:",
            w.vms, w.calls
        );
        let mut api = w.api_ms;
        let mut cli = w.cli_ms;
        let (a50, a99) = (percentile(&mut api, 0.5), percentile(&mut api, 0.99));
        let (c50, c99) = (percentile(&mut cli, 0.5), percentile(&mut cli, 0.99));
        println!("  (a) GET /api/vms                 p50 {a50:>7.2}   p99 {a99:>7.2}");
        println!("  (b) banger vm list --json        p50 {c50:>7.2}   p99 {c99:>7.2}");
        println!(
            "  ratio (a)/(b)                    p50 {:>7.3}   p99 {:>7.3}",
            a50 / c50,
            a99 / c99
        );
        let mut d = w.dashboard;
        println!(
            "web dashboard in chromium with {DASHBOARD_VMS} VMs (fc-double), {} stops:",
            d.request_to_dom_ms.len()
        );
        println!("  render, every row drawn          {:>7.1} ms", d.render_ms);
        println!(
            "  stream reports the stop -> row   p50 {:>7.1}   p99 {:>7.1} ms   (goal: within 200 ms of the change)",
            percentile(&mut d.stream_to_dom_ms, 0.5),
            percentile(&mut d.stream_to_dom_ms, 0.99)
        );
        println!(
            "  stop request -> row shows it     p50 {:>7.1}   p99 {:>7.1} ms   (includes the stop itself)",
            percentile(&mut d.request_to_dom_ms, 0.5),
            percentile(&mut d.request_to_dom_ms, 0.99)
        );
    }
    if want("layers") {
        let layers = layers_to_ext4(&image_dir, scratch.path(), runs)?;
        println!(
            "pulled layers to rootfs.ext4 ({} layers, {:.0} MiB compressed, {:.0} MiB tree), median of {runs}:",
            layers.count, layers.compressed_mib, layers.tree_mib
        );
        println!("  (a) tar -x + mkfs.ext4 -d        {:>7.2}s", layers.tar_s);
        println!(
            "  (b) banger-oci apply + ext4      {:>7.2}s   (digest verified while unpacking)",
            layers.banger_s
        );
        println!(
            "  ratio (b)/(a)                    {:>7.3}   (goal <= 1.2)",
            layers.banger_s / layers.tar_s
        );
    }
    if want("workspace") {
        let ws = workspace_figures(&env, scratch.path())?;
        println!(
            "workspace of {} files, {:.0} MiB working tree + {:.0} MiB .git (generated in {:.1}s):",
            ws.files, ws.tree_mib, ws.git_mib, ws.generate_s
        );
        let rate = |s: f64| {
            format!(
                "{:>8.0} files/s {:>6.1} MB/s",
                ws.files as f64 / s,
                (ws.tree_mib + ws.git_mib) * 1.048576 / s
            )
        };
        println!(
            "  (a) tar -c | vm ssh tar -x       {:>7.2}s  {}",
            ws.ssh_s,
            rate(ws.ssh_s)
        );
        println!(
            "  (b) banger workspace prepare     {:>7.2}s  {}",
            ws.prepare_s,
            rate(ws.prepare_s)
        );
        println!(
            "  ratio (b)/(a)                    {:>7.3}   (goal <= 1.0, aim 0.7)",
            ws.prepare_s / ws.ssh_s
        );
        println!(
            "  export of {} changed files as a patch: {:.2}s ({:.0} files/s, {:.1} MB/s; goal < 2 s)",
            ws.changed,
            ws.export_s,
            ws.changed as f64 / ws.export_s,
            ws.patch_mib * 1.048576 / ws.export_s
        );
        println!(
            "  the same as a branch: {:.2}s; applied to the host's tree: {:.2}s",
            ws.branch_s, ws.apply_s
        );
    }
    if want("net") {
        let requests: usize = std::env::var("BENCH_HTTPS_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        let mib: usize = std::env::var("BENCH_NET_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512);
        let mut outside = Outside::new(&env, scratch.path())?;
        let (mut nat, mut allow) = policy_throughput(&env, &mut outside, runs.max(7), mib)?;
        let (a, b) = (median(&mut nat), median(&mut allow));
        println!(
            "TCP throughput, guest -> outside sink ({mib} MiB, median of {}):",
            runs.max(7)
        );
        println!("  (a) nat, no policy               {a:>7.1} MB/s");
        println!("  (b) allow= list of 100 entries   {b:>7.1} MB/s");
        println!(
            "  ratio (b)/(a)                    {:>7.3}   (goal >= 0.95)",
            b / a
        );
        let (mut direct, mut proxied) = secrets_latency(&env, requests)?;
        drop(outside);
        println!("HTTPS request latency, guest -> outside server ({requests} requests each):");
        for (what, v) in [
            ("direct (no secrets)", &mut direct),
            ("through the secrets proxy", &mut proxied),
        ] {
            println!(
                "  {what:<28} p50 {:>7.2} ms  p99 {:>7.2} ms",
                percentile(v, 0.5),
                percentile(v, 0.99)
            );
        }
    }
    Ok(())
}

/// Answers every GET with `ok` over TLS on port 443 (`argv[1]` the
/// certificate, `argv[2]` its key).
const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = http.server.ThreadingHTTPServer(("0.0.0.0", 443), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// Reads each connection on port 9000 to its end and prints `BYTES
/// SECONDS` (first byte to end) for it.
const SINK_SERVER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    n, t0 = 0, None
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        if t0 is None:
            t0 = time.monotonic()
        n += len(b)
    c.close()
    print(n, time.monotonic() - (t0 or time.monotonic()), flush=True)
"#;

/// The outside namespace of the net section (198.18.0.2, the banger
/// namespace's default route), with an HTTPS server for `api.test` and a
/// TCP sink: deleted, its servers with it, on drop.
struct Outside {
    ns: String,
    servers: Vec<std::process::Child>,
    sink: Option<std::io::Lines<std::io::BufReader<std::process::ChildStdout>>>,
}

impl Drop for Outside {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .status();
    }
}

impl Outside {
    fn new(env: &Env, scratch: &Path) -> anyhow::Result<Outside> {
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let st = Command::new("ip").args(args).status()?;
            if !st.success() {
                bail!("ip {args:?} failed");
            }
            Ok(())
        };
        let mut outside = Outside {
            ns: format!("bgbench-out-{:06x}", fastrand::u32(..) & 0xffffff),
            servers: Vec::new(),
            sink: None,
        };
        let ns = outside.ns.clone();
        ip(&["netns", "add", &ns])?;
        ip(&[
            "-n", &env.netns, "link", "add", "bgb-in", "type", "veth", "peer", "name", "bgb-out",
            "netns", &ns,
        ])?;
        ip(&[
            "-n",
            &env.netns,
            "addr",
            "add",
            "198.18.0.1/30",
            "dev",
            "bgb-in",
        ])?;
        ip(&["-n", &env.netns, "link", "set", "bgb-in", "up"])?;
        ip(&[
            "-n",
            &env.netns,
            "route",
            "replace",
            "default",
            "via",
            "198.18.0.2",
        ])?;
        ip(&["-n", &ns, "addr", "add", "198.18.0.2/30", "dev", "bgb-out"])?;
        ip(&["-n", &ns, "link", "set", "bgb-out", "up"])?;
        // The server's CA, which the daemon is told to trust upstream.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(vec!["api.test".to_owned()])?
            .signed_by(&leaf_key, &issuer)?;
        let (ca, cert, key) = (
            scratch.join("upstream-ca.pem"),
            scratch.join("server.pem"),
            scratch.join("server.key"),
        );
        std::fs::write(&ca, ca_cert.pem())?;
        std::fs::write(&cert, leaf.pem())?;
        std::fs::write(&key, leaf_key.serialize_pem())?;
        std::fs::write(
            env.home.join("config.toml"),
            format!(
                "[pool]\nsize = 0\n[secrets]\nupstream_ca = {:?}\n",
                ca.display().to_string()
            ),
        )?;
        outside.servers.push(
            Command::new("ip")
                .args(["netns", "exec", &ns, "python3", "-c", HTTPS_SERVER])
                .arg(&cert)
                .arg(&key)
                .spawn()?,
        );
        let mut sink = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", SINK_SERVER])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
            sink.stdout.take().context("stdout")?,
        ));
        outside.servers.push(sink);
        if lines.next().transpose()?.as_deref() != Some("ready") {
            bail!("the sink server did not start");
        }
        outside.sink = Some(lines);
        // The daemon reads its config at start.
        let _ = env.ok(true, &["daemon", "stop"]);
        Ok(outside)
    }

    /// The next connection's `(bytes, seconds)`, as the sink measured it.
    fn sunk(&mut self) -> anyhow::Result<(u64, f64)> {
        let line = self
            .sink
            .as_mut()
            .context("sink")?
            .next()
            .context("the sink server exited")??;
        let (n, s) = line.split_once(' ').context("a sink line")?;
        Ok((n.parse()?, s.parse()?))
    }
}

/// MB/s of `mib` MiB sent from a guest to the outside sink, `runs` times
/// each from a VM under `nat` and from one under an `allow=` list of 100
/// entries (the sink's last), interleaved.
fn policy_throughput(
    env: &Env,
    outside: &mut Outside,
    runs: usize,
    mib: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut list: Vec<String> = (1..=99).map(|i| format!("203.0.113.{i}:443")).collect();
    list.push("198.18.0.2:9000".into());
    let allow = format!("allow={}", list.join(","));
    let vms = [("bnat", "nat"), ("ballow", allow.as_str())];
    for (name, net) in vms {
        env.ok(
            true,
            &[
                "vm",
                "create",
                "-q",
                "--no-ssh-wait",
                "--name",
                name,
                "--net",
                net,
            ],
        )?;
    }
    let send = format!("head -c {mib}M /dev/zero > /dev/tcp/198.18.0.2/9000");
    let mut figures = [Vec::new(), Vec::new()];
    for i in 0..runs {
        for (k, (name, _)) in vms.iter().enumerate() {
            env.ok(true, &["vm", "exec", name, "--", "bash", "-c", &send])?;
            let (bytes, secs) = outside.sunk()?;
            if bytes != (mib as u64) << 20 {
                bail!("{name}: the sink got {bytes} bytes of {mib} MiB");
            }
            figures[k].push(bytes as f64 / 1e6 / secs);
        }
        eprintln!(
            "run {}: nat {:.1} MB/s, allow-list {:.1} MB/s",
            i + 1,
            figures[0][i],
            figures[1][i]
        );
    }
    for (name, _) in vms {
        env.ok(true, &["vm", "delete", "--force", name])?;
    }
    let [nat, allow] = figures;
    Ok((nat, allow))
}

/// Milliseconds per request (curl's `time_total`) from a VM with the
/// secret for `api.test` and from one without, `requests` each.
fn secrets_latency(env: &Env, requests: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut set = env
        .banger(true, &["secret", "set", "TOKEN"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut set.stdin.take().context("stdin")?, b"bench-value")?;
    if !set.wait()?.success() {
        bail!("banger secret set failed");
    }
    let curl = format!(
        "for i in $(seq {requests}); do curl -sk -o /dev/null -w '%{{time_total}}\\n' \
         --resolve api.test:443:198.18.0.2 -H \"Authorization: Bearer $TOKEN\" https://api.test/ || exit 1; done"
    );
    let mut figures = Vec::new();
    for (name, extra) in [
        ("bdirect", &[][..]),
        ("bsecret", &["--secret", "TOKEN@api.test"][..]),
    ] {
        let mut args = vec!["vm", "create", "-q", "--no-ssh-wait", "--name", name];
        args.extend(extra);
        env.ok(true, &args)?;
        let out = env.ok(true, &["vm", "exec", name, "--", "sh", "-c", &curl])?;
        env.ok(true, &["vm", "delete", "--force", name])?;
        let ms: Vec<f64> = out
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .map(|s| s * 1000.0)
            .collect();
        if ms.len() != requests {
            bail!("{name}: {} of {requests} requests timed", ms.len());
        }
        figures.push(ms);
    }
    env.ok(true, &["secret", "rm", "TOKEN"])?;
    let proxied = figures.pop().expect("two runs");
    let direct = figures.pop().expect("two runs");
    Ok((direct, proxied))
}

struct SnapshotFigures {
    guest_mib: u64,
    guest_used_mib: f64,
    snapshot_s: f64,
    snapshot_mib: f64,
    cold_s: f64,
    restore_s: f64,
    stages: Vec<(String, u64)>,
}

/// One running guest snapshotted `runs` times (each snapshot but the last
/// deleted), then cold `vm run`s against `vm run --from` that snapshot,
/// interleaved so that both see the same machine load.
fn snapshot_figures(env: &Env, runs: usize) -> anyhow::Result<SnapshotFigures> {
    env.ok(
        true,
        &["vm", "create", "--name", "snapsrc", "--no-ssh-wait", "-q"],
    )?;
    let vm: serde_json::Value =
        serde_json::from_str(&env.ok(true, &["vm", "show", "snapsrc", "--json"])?)?;
    let used = env.ok(
        true,
        &[
            "vm",
            "exec",
            "snapsrc",
            "--",
            "sh",
            "-c",
            "free -m | awk '/^Mem:/ {print $3}'",
        ],
    )?;
    let mut snaps = Vec::new();
    let mut last = serde_json::Value::Null;
    for i in 0..runs {
        let name = format!("bench-{i}");
        let t = Instant::now();
        let out = env.ok(
            true,
            &["vm", "snapshot", "snapsrc", "--name", &name, "-q", "--json"],
        )?;
        snaps.push(t.elapsed().as_secs_f64());
        last = serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap_or("{}"))?
            ["result"]
            .clone();
        if i + 1 < runs {
            env.ok(true, &["snapshot", "delete", &name])?;
        }
    }
    let snap = last["name"].as_str().context("snapshot name")?.to_owned();
    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let t = Instant::now();
        env.ok(true, &["vm", "run", "-q", "--", "true"])?;
        cold.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        env.ok(true, &["vm", "run", "--from", &snap, "-q", "--", "true"])?;
        restored.push(t.elapsed().as_secs_f64());
        eprintln!(
            "run {}: cold vm run {:.2}s, vm run --from {:.2}s",
            i + 1,
            cold[i],
            restored[i]
        );
    }
    let events = env.ok(
        true,
        &[
            "vm",
            "create",
            "--from",
            &snap,
            "--name",
            "stages",
            "--no-ssh-wait",
            "--json",
        ],
    )?;
    let stages = done_stages(&events)?;
    env.ok(true, &["vm", "delete", "--force", "stages", "snapsrc"])?;
    env.ok(true, &["snapshot", "delete", &snap])?;
    Ok(SnapshotFigures {
        guest_mib: vm["memory_mib"].as_u64().unwrap_or(0),
        guest_used_mib: used.trim().parse().unwrap_or(0.0),
        snapshot_s: median(&mut snaps),
        snapshot_mib: last["disk_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0,
        cold_s: median(&mut cold),
        restore_s: median(&mut restored),
        stages,
    })
}

/// Cold `vm run -- true` (a `--vcpus` keeps it off the pool) against
/// the same from a refilled pool of one, interleaved.
fn pool_figures(env: &Env, runs: usize) -> anyhow::Result<(f64, f64)> {
    let config = env.home.join("config.toml");
    std::fs::write(&config, "[pool]\nsize = 1\n")?;
    env.stop_daemon();
    let pooled_ready = || -> anyhow::Result<bool> {
        let all: serde_json::Value =
            serde_json::from_str(&env.ok(true, &["vm", "list", "--all", "--json"])?)?;
        Ok(all.as_array().context("vm list")?.iter().any(|v| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("pool-") && !n.starts_with("pool-src-"))
                && v["state"] == "running"
        }))
    };
    let wait_pool = || -> anyhow::Result<()> {
        let t = Instant::now();
        while !pooled_ready()? {
            if t.elapsed() > Duration::from_secs(300) {
                bail!("the warm pool did not fill within 300 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    };
    let (mut cold, mut pooled) = (Vec::new(), Vec::new());
    for i in 0..runs {
        wait_pool()?;
        let t = Instant::now();
        env.ok(true, &["vm", "run", "-q", "--vcpus", "2", "--", "true"])?;
        cold.push(t.elapsed().as_secs_f64());
        wait_pool()?;
        let t = Instant::now();
        env.ok(true, &["vm", "run", "-q", "--", "true"])?;
        pooled.push(t.elapsed().as_secs_f64());
        eprintln!(
            "run {}: cold vm run {:.2}s, from the pool {:.2}s",
            i + 1,
            cold[i],
            pooled[i]
        );
    }
    std::fs::write(&config, "[pool]\nsize = 0\n")?;
    env.stop_daemon();
    // The next daemon empties the pool.
    env.ok(true, &["vm", "list"])?;
    Ok((median(&mut cold), median(&mut pooled)))
}

struct ForkFigures {
    one_s: f64,
    four_s: f64,
    /// The booted source VM, idle: its QEMU's RSS, PSS and PSS of file
    /// pages, and the guest's own count of the memory it uses (`free`'s
    /// "used"), MiB.
    source_rss_mib: f64,
    source_pss_mib: f64,
    source_file_mib: f64,
    /// Of the source's RSS: its guest RAM (the memfd) and TCG's
    /// translation buffers (anonymous executable mappings), MiB.
    source_ram_mib: f64,
    source_tcg_mib: f64,
    guest_used_mib: f64,
    /// Per fork count: RSS, PSS and PSS of file pages per fork, and PSS of
    /// all of them, MiB.
    density: Vec<(usize, f64, f64, f64, f64)>,
}

/// `Rss`, `Pss` and `Pss_File` of a process, MiB, from
/// `/proc/<pid>/smaps_rollup`. File pages (QEMU's binary and libraries,
/// a snapshot's memory file) are page
/// cache, shared and evictable; the rest is what the host cannot drop.
fn rss_pss_mib(pid: u64) -> anyhow::Result<(f64, f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Ok((field("Rss:"), field("Pss:"), field("Pss_File:")))
}

/// RSS of a QEMU process's guest RAM (its `banger-ram` memfd) and of TCG's
/// translation buffers (its anonymous executable mappings), MiB, from
/// `/proc/<pid>/smaps`.
fn ram_tcg_mib(pid: u64) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    // [guest RAM, TCG], and which of them the current mapping counts to.
    let mut sums = [0.0; 2];
    let mut kind = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let perms = words.next().unwrap_or("");
            let name = words.nth(3).unwrap_or("");
            kind = if name.contains("memfd:banger-ram") {
                Some(0)
            } else if name.is_empty() && perms.contains('x') {
                Some(1)
            } else {
                None
            };
        } else if first == "Rss:"
            && let Some(k) = kind
        {
            sums[k] += words.next().unwrap_or("0").parse::<f64>().unwrap_or(0.0) / 1024.0;
        }
    }
    Ok((sums[0], sums[1]))
}

/// One running guest forked `runs` times once and `runs` times four ways,
/// each fork to the first exec answered; then the host memory (RSS and PSS
/// of the QEMU processes) of the idle source and of 1, 4 and 8 idle forks.
fn fork_figures(env: &Env, runs: usize) -> anyhow::Result<ForkFigures> {
    // Booted to sshd and idle: a fork of a guest still starting carries
    // its start-up work into every fork, and measures that instead.
    env.ok(true, &["vm", "create", "--name", "forksrc", "-q"])?;
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Forks of `forksrc`, each to its first exec answered: the time, the
    // forks' pids and names, and the snapshot.
    let fork = |count: usize,
                prefix: &str|
     -> anyhow::Result<(f64, Vec<u64>, Vec<String>, String)> {
        let t = Instant::now();
        let out = env.ok(
            true,
            &[
                "vm",
                "fork",
                "forksrc",
                "--count",
                &count.to_string(),
                "--name",
                prefix,
                "-q",
                "--json",
            ],
        )?;
        let result = serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap_or("{}"))?
            ["result"]
            .clone();
        let names: Vec<String> = (1..=count).map(|n| format!("{prefix}-{n}")).collect();
        for n in &names {
            env.ok(true, &["vm", "exec", n, "--", "true"])?;
        }
        let took = t.elapsed().as_secs_f64();
        let pids = result["vms"]
            .as_array()
            .context("forks")?
            .iter()
            .map(|v| v["pid"].as_u64().context("fork pid"))
            .collect::<anyhow::Result<Vec<u64>>>()?;
        let snap = result["snapshot"]["name"].as_str().unwrap_or("").to_owned();
        Ok((took, pids, names, snap))
    };
    let remove = |names: &[String], snap: &str| -> anyhow::Result<()> {
        let mut delete = vec!["vm", "delete", "--force"];
        delete.extend(names.iter().map(String::as_str));
        env.ok(true, &delete)?;
        env.ok(true, &["snapshot", "delete", snap])?;
        Ok(())
    };
    let (mut one, mut four) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (t, _, names, snap) = fork(1, &format!("b1x{i}"))?;
        remove(&names, &snap)?;
        one.push(t);
        let (t, _, names, snap) = fork(4, &format!("b4x{i}"))?;
        remove(&names, &snap)?;
        four.push(t);
        eprintln!(
            "run {}: fork {:.2}s, fork --count 4 {:.2}s",
            i + 1,
            one[i],
            four[i]
        );
    }
    // Idle a moment, as VMs mostly are, before each measure.
    let idle = || std::thread::sleep(std::time::Duration::from_secs(3));
    idle();
    let src: serde_json::Value =
        serde_json::from_str(&env.ok(true, &["vm", "show", "forksrc", "--json"])?)?;
    let used = env.ok(
        true,
        &[
            "vm",
            "exec",
            "forksrc",
            "--",
            "sh",
            "-c",
            "free -m | awk '/^Mem:/ {print $3}'",
        ],
    )?;
    let src_pid = src["pid"].as_u64().context("source pid")?;
    let (source_rss_mib, source_pss_mib, source_file_mib) = rss_pss_mib(src_pid)?;
    let (source_ram_mib, source_tcg_mib) = ram_tcg_mib(src_pid)?;
    let mut density = Vec::new();
    for count in [1, 4, 8] {
        let (_, pids, names, snap) = fork(count, &format!("m{count}"))?;
        idle();
        let (mut rss, mut pss, mut file) = (0.0, 0.0, 0.0);
        for pid in pids {
            let (r, p, f) = rss_pss_mib(pid)?;
            rss += r;
            pss += p;
            file += f;
        }
        remove(&names, &snap)?;
        let n = count as f64;
        density.push((count, rss / n, pss / n, file / n, pss));
    }
    env.ok(true, &["vm", "delete", "--force", "forksrc"])?;
    Ok(ForkFigures {
        one_s: median(&mut one),
        four_s: median(&mut four),
        source_rss_mib,
        source_pss_mib,
        source_file_mib,
        source_ram_mib,
        source_tcg_mib,
        guest_used_mib: used.trim().parse().unwrap_or(0.0),
        density,
    })
}

struct WorkspaceFigures {
    files: usize,
    tree_mib: f64,
    git_mib: f64,
    generate_s: f64,
    ssh_s: f64,
    prepare_s: f64,
    changed: usize,
    export_s: f64,
    patch_mib: f64,
    branch_s: f64,
    apply_s: f64,
}

/// A generated repository (text files in directories of 100) sent into
/// one VM both ways; then 1,000 files changed in the guest exported.
fn workspace_figures(env: &Env, scratch: &Path) -> anyhow::Result<WorkspaceFigures> {
    let var = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let files = var("BENCH_WS_FILES", 50_000).max(1000);
    let mib = var("BENCH_WS_MIB", 1024);
    let repo = scratch.join("wsrepo");
    let t = Instant::now();
    let per_file = (mib << 20) / files;
    let line = "banger workspace benchmark line of text, compressible like source code\n";
    for i in 0..files {
        let path = repo.join(format!("d{:04}/f{i:06}.txt", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(path.parent().unwrap())?;
        }
        let mut body = format!("file {i}\n");
        while body.len() < per_file {
            body.push_str(line);
        }
        std::fs::write(&path, body)?;
    }
    let git = |args: &[&str]| {
        run(Command::new("git")
            .arg("-C")
            .arg(&repo)
            // No background auto-gc racing the explicit one.
            .args(["-c", "gc.auto=0"])
            .args(args)
            .env("GIT_AUTHOR_NAME", "bench")
            .env("GIT_AUTHOR_EMAIL", "bench@localhost")
            .env("GIT_COMMITTER_NAME", "bench")
            .env("GIT_COMMITTER_EMAIL", "bench@localhost"))
    };
    git(&["init", "-q"])?;
    git(&["add", "."])?;
    git(&["commit", "-q", "-m", "generated"])?;
    git(&["gc", "-q"])?;
    let generate_s = t.elapsed().as_secs_f64();
    let git_mib = du_mib(&repo.join(".git"))?;
    let tree_mib = du_mib(&repo)? - git_mib;
    let disk = format!("{}", 4096 + 3 * (mib + git_mib as usize));
    env.ok(
        true,
        &["vm", "create", "-q", "--name", "wsbench", "--disk", &disk],
    )?;

    // (a) the obvious hand-rolled way: tar through banger's ssh.
    let t = Instant::now();
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&repo)
        .args(["-cf", "-", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let st = env
        .banger(
            true,
            &[
                "vm",
                "ssh",
                "wsbench",
                "--",
                "mkdir -p /root/a && tar -xf - -C /root/a",
            ],
        )
        .stdin(tar.stdout.take().context("tar stdout")?)
        .status()?;
    if !tar.wait()?.success() || !st.success() {
        bail!("tar | vm ssh failed");
    }
    let ssh_s = t.elapsed().as_secs_f64();

    // (b) banger's prepare of the same repository.
    let t = Instant::now();
    env.ok(
        true,
        &[
            "workspace",
            "prepare",
            "wsbench",
            repo.to_str().context("utf-8")?,
            "--dest",
            "/root/b",
            "-q",
        ],
    )?;
    let prepare_s = t.elapsed().as_secs_f64();

    // 1,000 files changed in the guest, exported as a patch.
    let changed = 1000.min(files);
    env.ok(
        true,
        &[
            "vm",
            "exec",
            "wsbench",
            "--",
            "sh",
            "-c",
            &format!(
                "cd /root/b && ls d*/f*.txt | head -n {changed} | xargs sed -i '1s/$/ changed/'"
            ),
        ],
    )?;
    let patch = scratch.join("ws.patch");
    let t = Instant::now();
    env.ok(
        true,
        &[
            "workspace",
            "export",
            "wsbench",
            "--patch",
            patch.to_str().context("utf-8")?,
            "-q",
        ],
    )?;
    let export_s = t.elapsed().as_secs_f64();
    let patch_mib = std::fs::metadata(&patch)?.len() as f64 / 1048576.0;
    let timed = |args: &[&str]| -> anyhow::Result<f64> {
        let t = Instant::now();
        env.ok(true, args)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let branch_s = timed(&[
        "workspace",
        "export",
        "wsbench",
        "--branch",
        "from-the-bench",
        "-q",
    ])?;
    let apply_s = timed(&["workspace", "export", "wsbench", "--apply", "-q"])?;
    env.ok(true, &["vm", "delete", "--force", "wsbench"])?;
    Ok(WorkspaceFigures {
        files,
        tree_mib,
        git_mib,
        generate_s,
        ssh_s,
        prepare_s,
        changed,
        export_s,
        patch_mib,
        branch_s,
        apply_s,
    })
}

struct LayerFigures {
    count: usize,
    compressed_mib: f64,
    tree_mib: f64,
    tar_s: f64,
    banger_s: f64,
}

/// The default image's tree (read back out of its rootfs with debugfs) as
/// two gzip layers; then, `runs` times each, alternating: GNU tar extracts
/// them in order and `mkfs.ext4 -d` makes the ext4 (a), and banger-oci
/// applies them and makes the ext4 (b).
fn layers_to_ext4(image_dir: &Path, scratch: &Path, runs: usize) -> anyhow::Result<LayerFigures> {
    let work = scratch.join("layers");
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree)?;
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", tree.display()))
        .arg(image_dir.join("rootfs.ext4")))?;
    let tree_mib = du_mib(&tree)?;
    // Layer 1: everything but /usr; layer 2: /usr (what a Dockerfile's
    // package installs would add).
    let mut layers = Vec::new();
    for (name, args) in [
        ("base.tar.gz", vec!["--exclude=./usr", "."]),
        ("usr.tar.gz", vec!["./usr"]),
    ] {
        let out = work.join(name);
        let mut c = Command::new("tar");
        c.args(["--xattrs", "--numeric-owner", "-czf"])
            .arg(&out)
            .arg("-C")
            .arg(&tree)
            .args(args);
        run(&mut c)?;
        let bytes = std::fs::read(&out)?;
        let digest = {
            use sha2::Digest;
            format!("sha256:{:x}", sha2::Sha256::digest(&bytes))
        };
        layers.push((out, digest, bytes.len() as u64));
    }
    std::fs::remove_dir_all(&tree)?;
    let compressed_mib = layers.iter().map(|l| l.2).sum::<u64>() as f64 / 1048576.0;
    let (mut tar_s, mut banger_s) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let dir = work.join("x");
        let out = work.join("rootfs.ext4");
        // (a)
        std::fs::create_dir(&dir)?;
        let t = Instant::now();
        for (layer, _, _) in &layers {
            run(Command::new("tar")
                .args(["--xattrs", "--numeric-owner", "-xpzf"])
                .arg(layer)
                .arg("-C")
                .arg(&dir))?;
        }
        run(Command::new("mkfs.ext4")
            .args([
                "-q", "-F", "-t", "ext4", "-T", "default", "-b", "4096", "-L", "rootfs",
            ])
            .args(["-E", "root_owner=0:0", "-d"])
            .arg(&dir)
            .arg(&out)
            .arg("2048M"))?;
        tar_s.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dir)?;
        std::fs::remove_file(&out)?;
        // (b)
        std::fs::create_dir(&dir)?;
        let t = Instant::now();
        // The layers are the default image's own: no caps to enforce.
        let caps = banger_oci::Limits {
            max_bytes: u64::MAX,
            max_entries: u64::MAX,
        };
        let mut applier = banger_oci::Applier::new(&dir, caps);
        for (layer, digest, _) in &layers {
            match banger_oci::layer::apply_blob(&mut applier, std::fs::File::open(layer)?, digest)?
            {
                Ok(()) => {}
                Err(actual) => bail!("{} hashes to {actual}, not {digest}", layer.display()),
            }
        }
        applier.finish()?;
        banger_oci::rootfs::make_rootfs(&dir, &out)?;
        banger_s.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dir)?;
        std::fs::remove_file(&out)?;
        eprintln!(
            "layers run {}: tar -x + mkfs {:.2}s, banger-oci {:.2}s",
            i + 1,
            tar_s[i],
            banger_s[i]
        );
    }
    Ok(LayerFigures {
        count: layers.len(),
        compressed_mib,
        tree_mib,
        tar_s: median(&mut tar_s),
        banger_s: median(&mut banger_s),
    })
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn du_mib(dir: &Path) -> anyhow::Result<f64> {
    let out = Command::new("du").args(["-sm"]).arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0))
}

/// Wall time of `vm.create` (agent-ready) against fc-double, in ms.
/// fc-double as the `firecracker` binary, and the image `fcimg` it boots.
fn fc_double_setup(env: &Env, scratch: &Path) -> anyhow::Result<()> {
    let dir = scratch.join("fcimg");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy("/bin/true", dir.join("vmlinux"))?;
    for (f, label) in [("rootfs.ext4", "rootfs"), ("work-seed.ext4", "work")] {
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label])
            .arg(dir.join(f))
            .arg("16M")
            .status()?;
    }
    let wrapper = scratch.join("firecracker");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --guest-agent-cmd '{} --listen unix:{{sock}} --authorized-keys {}/ak --shutdown-action exit' \"$@\"\n",
            bin_dir().join("fc-double").display(),
            bin_dir().join("banger-agent").display(),
            scratch.display()
        ),
    )?;
    Command::new("chmod").arg("755").arg(&wrapper).status()?;
    std::fs::write(
        env.home.join("config.toml"),
        format!("[vmm]\nfirecracker_bin = \"{}\"\n", wrapper.display()),
    )?;
    env.ok(true, &["daemon", "stop"])?;
    let p = |f: &str| dir.join(f).display().to_string();
    env.ok(
        true,
        &[
            "image",
            "register",
            "fcimg",
            "--vmlinux",
            &p("vmlinux"),
            "--rootfs",
            &p("rootfs.ext4"),
            "--work-seed",
            &p("work-seed.ext4"),
        ],
    )?;
    Ok(())
}

/// Create one fc-double VM, quietly.
fn fc_create(env: &Env, name: &str) -> anyhow::Result<String> {
    fc_create_as(env, name, "-q")
}

/// Create one fc-double VM; `output`: `-q` or `--json`. What it printed.
fn fc_create_as(env: &Env, name: &str, output: &str) -> anyhow::Result<String> {
    env.ok(
        true,
        &[
            "vm",
            "create",
            output,
            "--name",
            name,
            "--image",
            "fcimg",
            "--vmm",
            "firecracker",
            "--disk",
            "64",
            "--no-ssh-wait",
        ],
    )
}

/// 20 creates of fc-double VMs, timed.
fn fc_creates(env: &Env) -> anyhow::Result<FcRuns> {
    let names: Vec<String> = (0..20).map(|i| format!("fc{i}")).collect();
    let mut runs = FcRuns::default();
    for n in &names {
        let t = Instant::now();
        let events = fc_create_as(env, n, "--json")?;
        runs.record(t, &events)?;
    }
    let mut args = vec!["vm", "delete", "--force"];
    args.extend(names.iter().map(String::as_str));
    env.ok(true, &args)?;
    Ok(runs)
}

/// The stages an operation's `--json` event stream reports done, with
/// their times in ms, in order.
fn done_stages(events: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let mut stages = Vec::new();
    for line in events.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["event"]["status"] == "done" {
            stages.push((
                v["event"]["stage"].as_str().unwrap_or("").to_string(),
                v["event"]["elapsed_ms"].as_u64().unwrap_or(0),
            ));
        }
    }
    Ok(stages)
}

/// Runs of one operation against fc-double.
#[derive(Default)]
struct FcRuns {
    /// Wall time of each, CLI included, in ms.
    wall_ms: Vec<f64>,
    /// Each stage's times, in ms, in the order the first run reported them.
    stages: Vec<(String, Vec<f64>)>,
}

/// The stages that are the stand-in's own work, not banger's: fc-double's
/// process start, its guest's start (the agent, started in namespaces of
/// its own, ends "kernel boot" and "agent ready") and, in a restore, the
/// identity script in that guest.
const FC_GUEST_STAGES: [&str; 4] = ["vmm start", "kernel boot", "agent ready", "identity"];

impl FcRuns {
    /// One run, begun at `started`, that printed the `--json` `events`.
    fn record(&mut self, started: Instant, events: &str) -> anyhow::Result<()> {
        self.wall_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        for (stage, ms) in done_stages(events)? {
            match self.stages.iter_mut().find(|(s, _)| *s == stage) {
                Some((_, times)) => times.push(ms as f64),
                None => self.stages.push((stage, vec![ms as f64])),
            }
        }
        Ok(())
    }

    /// Wall time, each stage and the daemon's share (the stages but
    /// [`FC_GUEST_STAGES`]), p50 and p99.
    fn print(mut self, what: &str, command: &str, goal_ms: f64) {
        println!("{what}, {} runs, ms:", self.wall_ms.len());
        println!(
            "  {:<32} p50 {:>7.1}   p99 {:>7.1}",
            format!("{command}, wall"),
            percentile(&mut self.wall_ms, 0.5),
            percentile(&mut self.wall_ms, 0.99)
        );
        let mut own = vec![0.0; self.wall_ms.len()];
        for (stage, times) in &mut self.stages {
            if !FC_GUEST_STAGES.contains(&stage.as_str()) {
                for (o, t) in own.iter_mut().zip(times.iter()) {
                    *o += t;
                }
            }
            println!(
                "    {stage:<30} p50 {:>7.1}   p99 {:>7.1}",
                percentile(times, 0.5),
                percentile(times, 0.99)
            );
        }
        println!(
            "  {:<32} p50 {:>7.1}   p99 {:>7.1}   (goal p50 <= {goal_ms} ms)",
            "daemon's share",
            percentile(&mut own, 0.5),
            percentile(&mut own, 0.99)
        );
        println!("    (the stages but {})", FC_GUEST_STAGES.join(", "));
    }
}

/// 20 restores of one snapshot of an fc-double VM, timed.
fn fc_restores(env: &Env) -> anyhow::Result<FcRuns> {
    fc_create(env, "fcsrc")?;
    env.ok(true, &["vm", "snapshot", "fcsrc", "--name", "fcsnap", "-q"])?;
    let names: Vec<String> = (0..20).map(|i| format!("fcr{i}")).collect();
    let mut runs = FcRuns::default();
    for n in &names {
        let t = Instant::now();
        let events = env.ok(
            true,
            &[
                "vm",
                "create",
                "--from",
                "fcsnap",
                "--name",
                n,
                "--no-ssh-wait",
                "--json",
            ],
        )?;
        runs.record(t, &events)?;
    }
    let mut args = vec!["vm", "delete", "--force", "fcsrc"];
    args.extend(names.iter().map(String::as_str));
    env.ok(true, &args)?;
    env.ok(true, &["snapshot", "delete", "fcsnap"])?;
    Ok(runs)
}

struct WebFigures {
    vms: usize,
    calls: usize,
    api_ms: Vec<f64>,
    cli_ms: Vec<f64>,
    dashboard: DashboardFigures,
}

/// 100 fc-double VMs listed through the web API (from a thread inside the
/// daemon's network namespace, logged in through `banger web`'s URL, one
/// connection per request as a plain client makes) and through the CLI.
fn web_figures(env: &Env) -> anyhow::Result<WebFigures> {
    const VMS: usize = 100;
    const CALLS: usize = 200;
    let names: Vec<String> = (0..VMS).map(|i| format!("web{i}")).collect();
    let login = || -> anyhow::Result<String> {
        let login: serde_json::Value = serde_json::from_str(&env.ok(true, &["web", "--json"])?)?;
        Ok(login["url"].as_str().context("web login url")?.to_string())
    };
    // The dashboard in a real browser with the first 50.
    for n in &names[..DASHBOARD_VMS] {
        fc_create(env, n)?;
    }
    let dashboard = dashboard_figures(env, &login()?, &names[..DASHBOARD_STOPS])?;
    for n in &names[DASHBOARD_VMS..] {
        fc_create(env, n)?;
    }
    let url = login()?;
    let ns = env.netns.clone();
    let api_ms = std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        use std::os::fd::AsFd;
        let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        let rest = url.strip_prefix("http://").context("an http URL")?;
        let (host, login_path) = rest.split_once('/').context("a path")?;
        let (_, head) = http_get(host, &format!("/{login_path}"), "")?;
        let cookie = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or(l.strip_prefix("Set-Cookie: "))
            })
            .and_then(|c| c.split(';').next())
            .context("a session cookie")?
            .to_string();
        let mut times = Vec::new();
        for _ in 0..CALLS {
            let t = Instant::now();
            let (body, head) = http_get(host, "/api/vms", &cookie)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            if !head.starts_with("HTTP/1.1 200") || !body.starts_with('[') {
                bail!("GET /api/vms: {head}");
            }
        }
        Ok(times)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the web client thread panicked"))??;
    let mut cli_ms = Vec::new();
    for _ in 0..CALLS {
        let t = Instant::now();
        env.ok(true, &["vm", "list", "--json"])?;
        cli_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut args = vec!["vm", "delete", "--force"];
    args.extend(names.iter().map(String::as_str));
    env.ok(true, &args)?;
    Ok(WebFigures {
        vms: VMS,
        calls: CALLS,
        api_ms,
        cli_ms,
        dashboard,
    })
}

/// VMs on the dashboard the browser measures, and how many of them it stops.
const DASHBOARD_VMS: usize = 50;
const DASHBOARD_STOPS: usize = 10;

struct DashboardFigures {
    /// Navigation to every VM's row drawn.
    render_ms: f64,
    /// A stop's request to the dashboard's row showing `stopped`.
    request_to_dom_ms: Vec<f64>,
    /// An independent `/api/vms` stream reporting the stop to the row
    /// showing it.
    stream_to_dom_ms: Vec<f64>,
}

/// The dashboard in Debian's chromium (`web_dashboard.js`, driven by
/// playwright-core from `target/browser`, which `scripts/deps.sh --test`
/// installs), inside the daemon's network namespace.
fn dashboard_figures(env: &Env, login: &str, stop: &[String]) -> anyhow::Result<DashboardFigures> {
    let target = bin_dir().parent().context("the target dir")?.to_path_buf();
    let modules = target.join("browser/node_modules");
    if !modules.join("playwright-core").is_dir() {
        bail!(
            "{} has no playwright-core: run scripts/deps.sh --test",
            modules.display()
        );
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &env.netns, "node"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/web_dashboard.js"))
        .env("NODE_PATH", &modules)
        .env("LOGIN_URL", login)
        .env("COUNT", DASHBOARD_VMS.to_string())
        .env("STOP", stop.join(","))
        .output()
        .context("run node")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| {
            format!(
                "no RESULT from web_dashboard.js: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let r: serde_json::Value = serde_json::from_str(line)?;
    if let Some(e) = r["error"].as_str() {
        bail!("web_dashboard.js: {e}");
    }
    let series = |key: &str| -> Vec<f64> {
        r["changes"]
            .as_array()
            .map(|c| c.iter().filter_map(|x| x[key].as_f64()).collect())
            .unwrap_or_default()
    };
    Ok(DashboardFigures {
        render_ms: r["render_ms"].as_f64().context("render_ms")?,
        request_to_dom_ms: series("request_to_dom_ms"),
        stream_to_dom_ms: series("stream_to_dom_ms"),
    })
}

/// `GET path` from `host` (`IP:PORT`) on a connection of its own: the
/// body and the head.
fn http_get(host: &str, path: &str, cookie: &str) -> anyhow::Result<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
    Ok((body.to_string(), head.to_string()))
}
