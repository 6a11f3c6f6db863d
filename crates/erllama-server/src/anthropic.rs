//! Anthropic's Messages API: `POST /v1/messages`.
//!
//! System blocks and content blocks render through the model's chat
//! template like OpenAI messages (a message's text blocks joined by a blank
//! line). A block's `cache_control: {"type": "ephemeral", "ttl": "5m" |
//! "1h"}` is an explicit breakpoint: the prompt's state at exactly the end
//! of that block is saved as a row of its own and pinned for its TTL
//! (renewed by every request that sets it), and `usage` reports
//! `cache_creation_input_tokens` (prompt tokens this request wrote as
//! breakpoint rows) and `cache_read_input_tokens` (prompt tokens not
//! computed: restored or shared) exactly. Errors come in Anthropic's shape,
//! `{"type": "error", "error": {"type", "message"}}`, and a stream in its
//! event format (`message_start`, `content_block_*`, `message_delta`,
//! `message_stop`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use erllama_engine::{
    Breakpoint, Completion, EngineError, Event, FinishReason, Prompt, PromptUsage, RequestOptions,
    RequestStream, SamplingParams,
};
use serde_json::{json, Value};

use crate::api::{
    authorize, blocking, boolean, check_model, field, first_event, integer_in, next_sse, number_in,
    parse_object, string, type_name, Admission, Obj, SseAnswer,
};
use crate::error::ApiError;
use crate::AppState;

/// Anthropic's limit on `cache_control` blocks in one request.
const MAX_CACHE_BLOCKS: usize = 4;

/// An error in Anthropic's shape (the status and message of an
/// [`ApiError`]; the field at fault leads the message).
pub(crate) struct AnthropicError(ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<EngineError> for AnthropicError {
    fn from(e: EngineError) -> Self {
        Self(e.into())
    }
}

impl AnthropicError {
    fn body(&self) -> Value {
        let e = &self.0;
        let kind = match e.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            _ => "api_error",
        };
        let message = match &e.param {
            Some(p) if !e.message.starts_with(p.as_str()) => format!("{p}: {}", e.message),
            _ => e.message.clone(),
        };
        json!({"type": "error", "error": {"type": kind, "message": message}})
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let mut response = (self.0.status, Json(self.body())).into_response();
        if let Some(secs) = self.0.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

type Result<T> = std::result::Result<T, AnthropicError>;

fn bad(param: &str, message: impl Into<String>) -> AnthropicError {
    ApiError::field(param, message).into()
}

/// One text block and its breakpoint TTL, if it has one.
struct Block {
    text: String,
    ttl: Option<Duration>,
}

/// `cache_control` of a block at `path`.
fn cache_control(path: &str, block: &Obj) -> Result<Option<Duration>> {
    let param = format!("{path}.cache_control");
    match block.get("cache_control") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(cc)) => {
            if cc.get("type").and_then(Value::as_str) != Some("ephemeral") {
                return Err(bad(
                    &format!("{param}.type"),
                    "cache_control type must be \"ephemeral\"",
                ));
            }
            match cc.get("ttl") {
                None | Some(Value::Null) => Ok(Some(Duration::from_secs(300))),
                Some(Value::String(t)) if t == "5m" => Ok(Some(Duration::from_secs(300))),
                Some(Value::String(t)) if t == "1h" => Ok(Some(Duration::from_secs(3600))),
                Some(v) => Err(bad(
                    &format!("{param}.ttl"),
                    format!("ttl must be \"5m\" or \"1h\", got {v}"),
                )),
            }
        }
        Some(v) => Err(bad(
            &param,
            format!("cache_control must be an object, got {}", type_name(v)),
        )),
    }
}

/// A string, or an array of text blocks.
fn blocks(path: &str, value: &Value) -> Result<Vec<Block>> {
    match value {
        Value::String(s) => Ok(vec![Block {
            text: s.clone(),
            ttl: None,
        }]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(j, item)| {
                let at = format!("{path}.{j}");
                let Value::Object(b) = item else {
                    return Err(bad(&at, "a content block must be an object"));
                };
                match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(Block {
                        text: t.clone(),
                        ttl: cache_control(&at, b)?,
                    }),
                    (Some("text"), _) => Err(bad(
                        &format!("{at}.text"),
                        "a text block needs a string text",
                    )),
                    (other, _) => Err(bad(
                        &format!("{at}.type"),
                        format!(
                            "content block type {} is not supported (only text)",
                            other.map_or_else(|| "(missing)".to_owned(), |k| format!("{k:?}"))
                        ),
                    )),
                }
            })
            .collect(),
        Value::Array(_) => Err(bad(path, "content must not be an empty array")),
        v => Err(bad(
            path,
            format!(
                "content must be a string or an array of blocks, got {}",
                type_name(v)
            ),
        )),
    }
}

/// A request's conversation: (role, blocks) in template order, system
/// first.
struct Conversation {
    turns: Vec<(&'static str, Vec<Block>)>,
}

const JOIN: &str = "\n\n";

impl Conversation {
    fn parse(obj: &Obj) -> Result<Self> {
        let mut turns = Vec::new();
        if let Some(system) = field(obj, "system") {
            let b = blocks("system", system)?;
            turns.push(("system", b));
        }
        let Some(Value::Array(messages)) = field(obj, "messages") else {
            return Err(bad(
                "messages",
                "messages is required: an array of {role, content}",
            ));
        };
        if messages.is_empty() {
            return Err(bad("messages", "messages must not be empty"));
        }
        for (i, m) in messages.iter().enumerate() {
            let at = format!("messages.{i}");
            let Value::Object(m) = m else {
                return Err(bad(&at, "a message must be an object"));
            };
            let role = match m.get("role").and_then(Value::as_str) {
                Some("user") => "user",
                Some("assistant") => "assistant",
                other => {
                    return Err(bad(
                        &format!("{at}.role"),
                        format!(
                            "role must be user or assistant, got {}",
                            other.map_or_else(|| "nothing".to_owned(), |r| format!("{r:?}"))
                        ),
                    ))
                }
            };
            let content = m
                .get("content")
                .ok_or_else(|| bad(&format!("{at}.content"), "content is required"))?;
            turns.push((role, blocks(&format!("{at}.content"), content)?));
        }
        // Top-level cache_control marks the last block (automatic caching).
        if let Some(Value::Object(_)) = obj.get("cache_control") {
            let ttl = cache_control("request", obj)?;
            if let Some(last) = turns.last_mut().and_then(|(_, b)| b.last_mut()) {
                last.ttl = last.ttl.max(ttl);
            }
        } else if field(obj, "cache_control").is_some() {
            let _ = cache_control("request", obj)?;
        }
        let marked = turns
            .iter()
            .flat_map(|(_, b)| b.iter())
            .filter(|b| b.ttl.is_some())
            .count();
        if marked > MAX_CACHE_BLOCKS {
            return Err(ApiError::bad_request(format!(
                "A maximum of {MAX_CACHE_BLOCKS} blocks with cache_control may be provided. \
                 Found {marked}."
            ))
            .into());
        }
        Ok(Self { turns })
    }

    /// The template's messages: every turn up to `upto` (turn index, and
    /// blocks of that turn to keep), or all of them.
    fn messages(&self, upto: Option<(usize, usize)>) -> Vec<(String, String)> {
        let (last, keep) = upto.unwrap_or((self.turns.len() - 1, usize::MAX));
        self.turns[..=last]
            .iter()
            .enumerate()
            .map(|(i, (role, blocks))| {
                let n = if i == last { keep } else { usize::MAX };
                let text: Vec<&str> = blocks.iter().take(n).map(|b| b.text.as_str()).collect();
                ((*role).to_owned(), text.join(JOIN))
            })
            .collect()
    }

    /// Whether the last turn is the assistant's (a prefill the answer
    /// continues).
    fn prefilled(&self) -> bool {
        self.turns.last().is_some_and(|(r, _)| *r == "assistant")
    }

    /// The breakpoints' places: (turn, blocks kept, ttl).
    fn marks(&self) -> Vec<(usize, usize, Duration)> {
        self.turns
            .iter()
            .enumerate()
            .flat_map(|(i, (_, blocks))| {
                blocks
                    .iter()
                    .enumerate()
                    .filter_map(move |(j, b)| b.ttl.map(|t| (i, j + 1, t)))
            })
            .collect()
    }
}

/// The prompt's tokens (an assistant turn last is continued, not closed)
/// and its breakpoints: each at the longest common prefix of the prompt
/// and the conversation rendered up to the end of its block.
fn render(
    backend: &Arc<dyn erllama_engine::Backend>,
    conv: &Conversation,
) -> std::result::Result<(Vec<u32>, Vec<Breakpoint>), ApiError> {
    let engine_err = |e| ApiError::from(EngineError::from(e));
    let all = conv.messages(None);
    let tokens = if conv.prefilled() {
        let (_, text) = &all[all.len() - 1];
        let mut t = backend
            .chat_tokens(&all[..all.len() - 1], true)
            .map_err(engine_err)?;
        t.extend(backend.tokenize(text, false).map_err(engine_err)?);
        t
    } else {
        backend.chat_tokens(&all, true).map_err(engine_err)?
    };
    let mut breakpoints: Vec<Breakpoint> = Vec::new();
    for (turn, keep, ttl) in conv.marks() {
        let upto = conv.messages(Some((turn, keep)));
        let rendered = backend.chat_tokens(&upto, false).map_err(engine_err)?;
        let at = tokens
            .iter()
            .zip(&rendered)
            .take_while(|(a, b)| a == b)
            .count();
        if at == 0 {
            continue;
        }
        match breakpoints.last_mut() {
            Some(last) if last.tokens >= at => {
                // Two marks on one boundary: one row, the longer pin.
                last.pin = last.pin.max(Some(ttl));
            }
            _ => breakpoints.push(Breakpoint {
                tokens: at,
                pin: Some(ttl),
            }),
        }
    }
    Ok((tokens, breakpoints))
}

/// The request's sampling and limits.
struct Params {
    model: String,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
}

fn params(obj: &Obj) -> Result<Params> {
    let model = string(obj, "model")?.ok_or_else(|| bad("model", "model is required"))?;
    let max_tokens = integer_in(obj, "max_tokens", 1, 1 << 20)?
        .ok_or_else(|| bad("max_tokens", "max_tokens is required"))?;
    let temperature = number_in(obj, "temperature", 0.0, 1.0)?.unwrap_or(1.0);
    let top_p = number_in(obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(bad("top_p", "top_p must be above 0"));
    }
    let top_k = integer_in(obj, "top_k", 0, i64::from(u32::MAX))?.unwrap_or(0);
    let stop = match field(obj, "stop_sequences") {
        None => Vec::new(),
        Some(Value::Array(items)) if items.len() <= 16 => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(bad(
                    "stop_sequences",
                    "stop_sequences must be non-empty strings",
                )),
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(bad(
                "stop_sequences",
                "stop_sequences must be an array of up to 16 strings",
            ))
        }
    };
    for name in ["tools", "tool_choice"] {
        match field(obj, name) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(bad(name, format!("{name} is not supported by this server")));
            }
        }
    }
    if let Some(Value::Object(o)) = field(obj, "output_config") {
        if field(o, "format").is_some() {
            return Err(bad(
                "output_config.format",
                "structured output formats are not supported by this server",
            ));
        }
    }
    if let Some(t) = field(obj, "thinking") {
        if t.get("type").and_then(Value::as_str) != Some("disabled") {
            return Err(bad(
                "thinking",
                "extended thinking is not supported by this server",
            ));
        }
    }
    #[allow(clippy::cast_possible_truncation)]
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: u32::try_from(top_k).unwrap_or(0),
        ..SamplingParams::default()
    };
    Ok(Params {
        model,
        max_tokens: usize::try_from(max_tokens).unwrap_or(1 << 20),
        sampling,
        stop,
        stream: boolean(obj, "stream")?.unwrap_or(false),
    })
}

/// `usage` of the Messages API: the prompt split into what was read from
/// the cache, what this request wrote as breakpoint rows (by TTL), and the
/// rest.
fn usage(p: &PromptUsage, breakpoints: &[Breakpoint], output_tokens: usize) -> Value {
    let read = p.prompt_tokens.saturating_sub(p.prefill_tokens);
    let (mut five, mut hour, mut from) = (0usize, 0usize, read);
    for b in breakpoints {
        if b.tokens > from && b.tokens <= p.breakpoint_written {
            let n = b.tokens - from;
            if b.pin > Some(Duration::from_secs(300)) {
                hour += n;
            } else {
                five += n;
            }
            from = b.tokens;
        }
    }
    let created = five + hour;
    json!({
        "input_tokens": p.prompt_tokens - read - created,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": five,
            "ephemeral_1h_input_tokens": hour,
        },
    })
}

fn prompt_usage(c: &Completion) -> PromptUsage {
    PromptUsage {
        prompt_tokens: c.stats.prompt_tokens,
        prefill_tokens: c.stats.prefill_tokens,
        breakpoint_written: c.stats.breakpoint_written,
    }
}

/// `stop_reason` and `stop_sequence`.
fn stop_reason(c: &Completion) -> (&'static str, Option<String>) {
    match (c.stats.finish_reason, &c.stats.stop_sequence) {
        (FinishReason::Length, _) => ("max_tokens", None),
        (_, Some(s)) => ("stop_sequence", Some(s.clone())),
        _ => ("end_turn", None),
    }
}

fn message_id(request: u64) -> String {
    format!("msg_{request:024}")
}

/// A streamed answer in Anthropic's event format.
struct Streaming {
    model: String,
    id: String,
    breakpoints: Vec<Breakpoint>,
    events: RequestStream,
    first: Option<Event>,
    out: VecDeque<SseEvent>,
    started: bool,
    ended: bool,
    admission: Admission,
}

fn sse(kind: &str, data: &Value) -> SseEvent {
    SseEvent::default().event(kind).data(data.to_string())
}

impl Streaming {
    fn start(&mut self, prompt: &PromptUsage) {
        self.started = true;
        let message = json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": usage(prompt, &self.breakpoints, 0),
        });
        self.out.push_back(sse(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ));
        self.out.push_back(sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ));
        self.out.push_back(sse("ping", &json!({"type": "ping"})));
    }

    fn text(&mut self, text: &str) {
        if !text.is_empty() {
            self.out.push_back(sse(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text}}),
            ));
        }
    }

    fn error(&mut self, e: ApiError) {
        let body = AnthropicError(e).body();
        self.out.push_back(sse("error", &body));
        self.ended = true;
    }

    fn push(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Token { text, prompt, .. }) => {
                if !self.started {
                    // The first token carries the prompt's usage.
                    let p = prompt.unwrap_or(PromptUsage {
                        prompt_tokens: 0,
                        prefill_tokens: 0,
                        breakpoint_written: 0,
                    });
                    self.start(&p);
                }
                self.text(&text);
            }
            Some(Event::Done(Ok(c))) => {
                self.admission.0.metrics.per_token(
                    &self.model,
                    c.stats.generation_ms,
                    c.stats.completion_tokens,
                );
                let prompt = prompt_usage(&c);
                if !self.started {
                    self.start(&prompt);
                }
                self.out.push_back(sse(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ));
                let (reason, sequence) = stop_reason(&c);
                self.out.push_back(sse(
                    "message_delta",
                    &json!({"type": "message_delta",
                            "delta": {"stop_reason": reason, "stop_sequence": sequence},
                            "usage": usage(&prompt, &self.breakpoints, c.stats.completion_tokens)}),
                ));
                self.out
                    .push_back(sse("message_stop", &json!({"type": "message_stop"})));
                self.ended = true;
            }
            Some(Event::Done(Err(e))) => self.error(e.into()),
            None => self.error(ApiError::from(EngineError::ModelGone(
                self.model.clone(),
                "the model stopped".into(),
            ))),
        }
    }
}

impl SseAnswer for Streaming {
    fn parts(
        &mut self,
    ) -> (
        &mut VecDeque<SseEvent>,
        bool,
        &mut Option<Event>,
        &mut RequestStream,
    ) {
        (&mut self.out, self.ended, &mut self.first, &mut self.events)
    }

    fn push(&mut self, event: Option<Event>) {
        Streaming::push(self, event);
    }
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let arrived = Instant::now();
    authorize(&state, &headers)?;
    let admission = Admission::enter(&state)?;
    let obj = parse_object(&body)?;
    let params = params(&obj)?;
    let conv = Conversation::parse(&obj)?;
    check_model(&state, &params.model)?;
    let backend = state.engine.backend(&params.model)?;
    let (tokens, breakpoints) = blocking(move || render(&backend, &conv)).await?;
    let options = RequestOptions {
        max_tokens: params.max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        parent_key: None,
        breakpoints: breakpoints.clone(),
    };
    let mut events = state
        .engine
        .submit(&params.model, Prompt::Tokens(tokens), options)?;
    let first = first_event(&state, &params.model, &mut events, arrived).await?;
    if !params.stream {
        let c = match first {
            Event::Done(Ok(c)) => c,
            _ => events.collect().await.map_err(ApiError::from)?,
        };
        state.metrics.per_token(
            &params.model,
            c.stats.generation_ms,
            c.stats.completion_tokens,
        );
        let (reason, sequence) = stop_reason(&c);
        return Ok(Json(json!({
            "id": message_id(c.request_id),
            "type": "message",
            "role": "assistant",
            "model": params.model,
            "content": [{"type": "text", "text": c.text}],
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage(&prompt_usage(&c), &breakpoints, c.stats.completion_tokens),
        }))
        .into_response());
    }
    let streaming = Streaming {
        id: message_id(events.id),
        model: params.model,
        breakpoints,
        events,
        first: Some(first),
        out: VecDeque::new(),
        started: false,
        ended: false,
        admission,
    };
    let stream = futures_util::stream::unfold(streaming, next_sse);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
