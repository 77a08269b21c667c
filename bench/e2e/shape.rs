//! Line-rate mode (`--rate`): a token-bucket filter on both ends of the veth pair, so
//! that every path, the direct one included, crosses the same emulated link.

use std::process::{Command, Stdio};

use crate::common::Topology;

/// Queue of the token bucket, as time at the line rate. At 1 Gbit/s this is ~2.5 MB,
/// enough to absorb a sender's bursts without being a bufferbloat experiment.
const LATENCY_MS: u64 = 20;
/// Smallest bucket. veth keeps 64 KiB GSO super-packets whole and tbf segments any skb
/// larger than its bucket; with a 64 KiB bucket (5 ms queue) iperf3 measured
/// retransmissions with 4 streams and one single-stream upload that moved nothing,
/// with 256 KiB none, at 0.957 Gbit/s of payload (1448 of every 1514 bytes) with 1 and 4
/// streams each way.
const MIN_BURST: u64 = 256 * 1024;
/// At higher rates the bucket holds this much time of the rate, so that timer slack does
/// not leave the link idle.
const BURST_MS: u64 = 2;

/// A line rate for both veth ends.
#[derive(Clone, Debug)]
pub struct Shaping {
    /// As given on the command line (e.g. `1gbit`), for labels and file names.
    pub name: String,
    pub bits_per_second: u64,
}

impl Shaping {
    /// Parses a rate in tc's bit units: a number followed by `bit`, `kbit`, `mbit`,
    /// `gbit` or `tbit` (decimal multiples), or a bare number of bits per second.
    pub fn parse(text: &str) -> Result<Shaping, String> {
        let lower = text.trim().to_ascii_lowercase();
        let split = lower
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(lower.len());
        let (number, unit) = lower.split_at(split);
        let multiplier = match unit {
            "" | "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "tbit" => 1e12,
            _ => {
                return Err(format!(
                    "--rate {text:?}: use bit, kbit, mbit, gbit or tbit"
                ));
            }
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("--rate {text:?}: not a number"))?;
        let bits_per_second = (value * multiplier) as u64;
        // Below this tbf's bucket (256 KiB) would be seconds of traffic.
        if bits_per_second < 1_000_000 {
            return Err(format!("--rate {text:?}: at least 1mbit"));
        }
        Ok(Shaping {
            name: lower,
            bits_per_second,
        })
    }

    pub fn burst_bytes(&self) -> u64 {
        (self.bits_per_second / 8 * BURST_MS / 1000).max(MIN_BURST)
    }

    /// The qdisc parameters, as given to tc.
    pub fn tbf(&self) -> String {
        format!(
            "tbf rate {}bit burst {} latency {LATENCY_MS}ms",
            self.bits_per_second,
            self.burst_bytes()
        )
    }

    /// Puts the qdisc on both veth ends and checks that it is there.
    pub fn apply(&self, topo: &Topology) -> Result<(), String> {
        for (ns, dev) in ends(topo) {
            let add = format!("-n {ns} qdisc replace dev {dev} root {}", self.tbf());
            tc(&add)?;
            let shown = tc(&format!("-n {ns} qdisc show dev {dev}"))?;
            if !shown.contains("tbf") {
                return Err(format!("no tbf on {dev} after `tc {add}`: {shown}"));
            }
        }
        Ok(())
    }

    /// Removes the qdiscs again (deleting the namespaces would too, but the resource
    /// figures that follow run unshaped).
    pub fn remove(topo: &Topology) {
        for (ns, dev) in ends(topo) {
            if let Err(e) = tc(&format!("-n {ns} qdisc del dev {dev} root")) {
                eprintln!("e2e: {e}");
            }
        }
    }
}

fn ends(topo: &Topology) -> [(&str, &str); 2] {
    [
        (topo.client_ns(), topo.client_veth()),
        (topo.server_ns(), topo.server_veth()),
    ]
}

fn tc(args: &str) -> Result<String, String> {
    let output = Command::new("tc")
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run tc (iproute2): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`tc {args}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim_end()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
