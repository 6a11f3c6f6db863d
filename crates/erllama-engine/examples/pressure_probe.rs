//! Prints one reading of every built-in pressure sampler, with details:
//! `cargo run --release -p erllama-engine --example pressure_probe`.
//! Used to check the NVML path on a GPU machine.

use erllama_engine::{NoopSampler, NvmlSampler, PressureSampler, SystemSampler};

fn main() {
    let samplers: Vec<Box<dyn PressureSampler>> = vec![
        Box::new(NoopSampler),
        Box::new(SystemSampler::new()),
        Box::new(NvmlSampler::new()),
    ];
    for s in samplers {
        match s.sample() {
            Ok(r) => println!(
                "{}: used {} / total {} bytes ({:.1} %)",
                s.name(),
                r.used,
                r.total,
                100.0 * r.used as f64 / r.total.max(1) as f64
            ),
            Err(e) => println!("{}: {e}", s.name()),
        }
        for (k, v) in s.details() {
            println!("  {k}: {v}");
        }
    }
}
