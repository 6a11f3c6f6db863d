//! `GET /metrics`: Prometheus text format, from the `prometheus` crate.
//!
//! - `erllama_http_requests_total{endpoint, status}`;
//! - `erllama_time_to_first_token_seconds{model}` and
//!   `erllama_time_per_output_token_seconds{model}` histograms;
//! - `erllama_requests_running{model}`, `erllama_requests_queued{model}`,
//!   `erllama_kv_cells_used{model}` gauges;
//! - every cache counter as `erllama_cache_<name>` (the live-byte ones,
//!   `erllama_cache_bytes_<tier>`, as gauges; the others as counters, which
//!   `cache.reset_counters()` may reset, as a process restart would).

use std::time::Duration;

use erllama_engine::Engine;
use prometheus::proto::{Counter, Gauge, Metric, MetricFamily, MetricType};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    ttft: HistogramVec,
    per_token: HistogramVec,
    running: IntGaugeVec,
    queued: IntGaugeVec,
    cells: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "erllama_http_requests_total",
                "HTTP requests answered, by endpoint and status code.",
            ),
            &["endpoint", "status"],
        )?;
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "erllama_time_to_first_token_seconds",
                "From the request's arrival to its first generated token.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )?;
        let per_token = HistogramVec::new(
            HistogramOpts::new(
                "erllama_time_per_output_token_seconds",
                "A request's mean time per generated token after the first.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )?;
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["model"]);
        let running = gauge(
            "erllama_requests_running",
            "Requests running on a sequence.",
        )?;
        let queued = gauge(
            "erllama_requests_queued",
            "Requests waiting for a sequence or KV cells (the model's queue depth).",
        )?;
        let cells = gauge(
            "erllama_kv_cells_used",
            "KV cells the model's sequences hold.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(per_token.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(cells.clone()))?;
        Ok(Self {
            registry,
            requests,
            ttft,
            per_token,
            running,
            queued,
            cells,
        })
    }

    /// Counts an answered request.
    pub(crate) fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .with_label_values(&[endpoint, &status.to_string()])
            .inc();
    }

    /// A request's time to its first token.
    pub(crate) fn first_token(&self, model: &str, after: Duration) {
        self.ttft
            .with_label_values(&[model])
            .observe(after.as_secs_f64());
    }

    /// A request's mean time per token after the first.
    pub(crate) fn per_token(&self, model: &str, generation_ms: f64, tokens: usize) {
        if tokens > 1 {
            #[allow(clippy::cast_precision_loss)]
            let per = generation_ms / 1e3 / (tokens - 1) as f64;
            self.per_token.with_label_values(&[model]).observe(per);
        }
    }

    /// The text exposition, the engine's live state read now.
    pub(crate) fn render(&self, engine: &Engine) -> Result<String, prometheus::Error> {
        for id in engine.models() {
            if let Ok(info) = engine.info(&id) {
                let set = |g: &IntGaugeVec, v: usize| {
                    g.with_label_values(&[id.as_str()])
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                };
                set(&self.running, info.running);
                set(&self.queued, info.queued);
                set(&self.cells, info.kv_cells_used);
            }
        }
        let mut families = self.registry.gather();
        families.extend(cache_families(engine));
        prometheus::TextEncoder::new().encode_to_string(&families)
    }
}

/// Every cache counter, read now.
fn cache_families(engine: &Engine) -> Vec<MetricFamily> {
    let counters = engine.cache().counters();
    erllama_cache::Counter::ALL
        .iter()
        .map(|&c| {
            #[allow(clippy::cast_precision_loss)]
            let value = counters.get(c) as f64;
            let mut metric = Metric::default();
            let mut family = MetricFamily::default();
            family.set_name(format!("erllama_cache_{}", c.name()));
            if c.is_gauge() {
                let mut g = Gauge::default();
                g.set_value(value);
                metric.set_gauge(g);
                family.set_field_type(MetricType::GAUGE);
                family.set_help(format!("The cache's {} (bytes stored now).", c.name()));
            } else {
                let mut k = Counter::default();
                k.set_value(value);
                metric.set_counter(k);
                family.set_field_type(MetricType::COUNTER);
                family.set_help(format!("The cache's {} counter.", c.name()));
            }
            family.set_metric(vec![metric]);
            family
        })
        .collect()
}
