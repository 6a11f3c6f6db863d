//! The OpenAI-compatible handlers: request checking, the engine call, and
//! the answer (JSON, or server-sent events with `stream: true`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use erllama_engine::{
    Breakpoint, Completion, EngineError, Event, FinishReason, Prompt, RequestOptions,
    RequestStream, SamplingParams,
};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::{unix_now, AppState};

pub(crate) type Obj = Map<String, Value>;

/// `response_format: {"type": "json_object"}`: the output is a JSON object
/// (llama.cpp's `grammars/json.gbnf`, the grammar its server uses).
const JSON_OBJECT_GRAMMAR: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"#;

/// A chat's leading system messages of at least this many tokens are a
/// breakpoint: their row is saved, and concurrent requests with the same
/// system prompt share exactly its tokens.
const SYSTEM_BREAKPOINT_MIN: usize = 64;

/// A request being served: counted in `active` until dropped (for a
/// stream, when the stream ends or its client goes away).
pub(crate) struct Admission(pub(crate) Arc<AppState>);

impl Admission {
    pub(crate) fn enter(state: &Arc<AppState>) -> Result<Self, ApiError> {
        let before = state.active.fetch_add(1, Ordering::AcqRel);
        let admission = Admission(Arc::clone(state));
        if before >= state.max_queue {
            return Err(ApiError::overloaded(format!(
                "the server is serving {} requests, its limit (--max-queue); retry shortly",
                state.max_queue
            )));
        }
        Ok(admission)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if bearer == Some(key.as_str()) || x_api_key == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

// --- field checks ---

pub(crate) fn parse_object(body: &Bytes) -> Result<Obj, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

/// The field, unless absent or `null`.
pub(crate) fn field<'a>(obj: &'a Obj, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn string(obj: &Obj, name: &str) -> Result<Option<String>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(ApiError::field(
            name,
            format!("{name} must be a string, got {}", type_name(v)),
        )),
    }
}

pub(crate) fn boolean(obj: &Obj, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::field(
            name,
            format!("{name} must be a boolean, got {}", type_name(v)),
        )),
    }
}

pub(crate) fn number_in(obj: &Obj, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::field(
                name,
                format!("{name} must be between {lo} and {hi}, got {n}"),
            )),
        },
        Some(v) => Err(ApiError::field(
            name,
            format!("{name} must be a number, got {}", type_name(v)),
        )),
    }
}

pub(crate) fn integer_in(obj: &Obj, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::field(
                name,
                format!("{name} must be an integer between {lo} and {hi}, got {n}"),
            )),
        },
        Some(v) => Err(ApiError::field(
            name,
            format!("{name} must be an integer, got {}", type_name(v)),
        )),
    }
}

/// `stop`: a string or up to 4 strings.
fn stop_list(obj: &Obj) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::field(
            "stop",
            "stop must be a string or an array of up to 4 strings",
        )
    };
    match field(obj, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// What chat and text completions share.
struct Common {
    model: String,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

/// Fields erllama does not implement: refused when they ask for something
/// other than the default, rather than silently ignored.
pub(crate) fn refuse_unsupported(obj: &Obj, names: &[(&str, Value)]) -> Result<(), ApiError> {
    for (name, default) in names {
        if let Some(v) = field(obj, name) {
            if v != default {
                return Err(ApiError::field(
                    name,
                    format!("{name} is not supported by this server"),
                ));
            }
        }
    }
    Ok(())
}

fn common(obj: &Obj, max_tokens_names: &[&str]) -> Result<Common, ApiError> {
    let model =
        string(obj, "model")?.ok_or_else(|| ApiError::field("model", "model is required"))?;
    let mut max_tokens = None;
    for name in max_tokens_names {
        if let Some(n) = integer_in(obj, name, 1, 1 << 20)? {
            max_tokens = Some(usize::try_from(n).unwrap_or(1 << 20));
        }
    }
    if let Some(n) = integer_in(obj, "n", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
    }
    let temperature = number_in(obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = number_in(obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::field("top_p", "top_p must be above 0"));
    }
    let seed =
        integer_in(obj, "seed", i64::MIN, i64::MAX)?.map(|s| u64::from_ne_bytes(s.to_ne_bytes()));
    let stream = boolean(obj, "stream")?.unwrap_or(false);
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")
            .map_err(|_| {
                ApiError::field(
                    "stream_options.include_usage",
                    "stream_options.include_usage must be a boolean",
                )
            })?
            .unwrap_or(false),
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("stream_options must be an object, got {}", type_name(v)),
            ))
        }
    };
    if include_usage && !stream {
        return Err(ApiError::field(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    refuse_unsupported(
        obj,
        &[
            ("presence_penalty", json!(0)),
            ("frequency_penalty", json!(0)),
            ("logprobs", json!(false)),
            ("logit_bias", json!({})),
        ],
    )?;
    #[allow(clippy::cast_possible_truncation)]
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        ..SamplingParams::default()
    };
    Ok(Common {
        model,
        max_tokens,
        sampling,
        stop: stop_list(obj)?,
        stream,
        include_usage,
    })
}

/// The text of a message's `content`: a string, or text parts.
fn content_text(index: usize, content: Option<&Value>) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some("text"), _) => {
                        return Err(ApiError::field(
                            &format!("{param}[{j}].text"),
                            "a text part needs a string text",
                        ))
                    }
                    (other, _) => {
                        return Err(ApiError::field(
                            &format!("{param}[{j}].type"),
                            format!(
                                "content part type {} is not supported (only text)",
                                other.map_or_else(|| "(missing)".to_owned(), |k| format!("{k:?}"))
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(v) => Err(ApiError::field(
            &param,
            format!(
                "content must be a string or an array of parts, got {}",
                type_name(v)
            ),
        )),
    }
}

/// `messages` as (role, text) pairs for the chat template.
fn chat_messages(obj: &Obj) -> Result<Vec<(String, String)>, ApiError> {
    let Some(Value::Array(messages)) = field(obj, "messages") else {
        return Err(ApiError::field(
            "messages",
            "messages is required: an array of {role, content}",
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::field("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(ApiError::field(
                    &format!("messages[{i}]"),
                    "a message must be an object",
                ));
            };
            let role = match m.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => "system",
                Some("user") => "user",
                Some("assistant") => "assistant",
                other => {
                    return Err(ApiError::field(
                        &format!("messages[{i}].role"),
                        format!(
                            "role must be system, developer, user or assistant, got {}",
                            other.map_or_else(|| "nothing".to_owned(), |r| format!("{r:?}"))
                        ),
                    ))
                }
            };
            Ok((role.to_owned(), content_text(i, m.get("content"))?))
        })
        .collect()
}

pub(crate) fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    state.engine.info(model).map(|_| ()).map_err(|_| {
        ApiError::not_found(
            format!("the model {model:?} does not exist (GET /v1/models lists them)"),
            "model_not_found",
        )
    })
}

/// Runs CPU work (tokenizing, the chat template) off the runtime's
/// workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a worker failed: {e}")))?
}

// --- answers ---

fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// `usage`, with `cached_tokens` exactly the prompt tokens not computed
/// for this request (restored from the cache or shared).
fn usage(c: &Completion) -> Value {
    let s = &c.stats;
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": s.prompt_tokens.saturating_sub(s.prefill_tokens),
        },
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Text,
}

impl Api {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Text, _) => "text_completion",
        }
    }

    fn id(self, request: u64) -> String {
        match self {
            Api::Chat => format!("chatcmpl-{request}"),
            Api::Text => format!("cmpl-{request}"),
        }
    }

    /// One choice carrying `text` (a delta for a chat chunk).
    fn choice(self, text: Option<&str>, finish: Option<&str>, chunk: bool, first: bool) -> Value {
        match (self, chunk) {
            (Api::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text.unwrap_or("")},
                "finish_reason": finish,
                "logprobs": null,
            }),
            (Api::Chat, true) => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            (Api::Text, _) => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "finish_reason": finish,
                "logprobs": null,
            }),
        }
    }
}

fn whole(api: Api, model: &str, c: &Completion) -> Value {
    json!({
        "id": api.id(c.request_id),
        "object": api.object(false),
        "created": unix_now(),
        "model": model,
        "choices": [api.choice(Some(&c.text), Some(finish_label(c.stats.finish_reason)), false, false)],
        "usage": usage(c),
        "system_fingerprint": null,
    })
}

/// A streamed answer: the engine's events as SSE chunks, then `[DONE]`.
struct Streaming {
    api: Api,
    model: String,
    id: String,
    created: u64,
    include_usage: bool,
    events: RequestStream,
    /// The first engine event, read before the response was chosen.
    first: Option<Event>,
    out: VecDeque<SseEvent>,
    started: bool,
    ended: bool,
    admission: Admission,
}

impl Streaming {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> SseEvent {
        let mut body = json!({
            "id": self.id,
            "object": self.api.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": null,
        });
        if let Some(u) = usage {
            body["usage"] = u;
        }
        SseEvent::default().data(body.to_string())
    }

    /// Turns one engine event into chunks.
    fn push(&mut self, event: Option<Event>) {
        let first = !self.started;
        self.started = true;
        if first && self.api == Api::Chat {
            let c = self.api.choice(Some(""), None, true, true);
            let e = self.chunk(json!([c]), None);
            self.out.push_back(e);
        }
        match event {
            Some(Event::Token { text, .. }) => {
                if !text.is_empty() {
                    let c = self.api.choice(Some(&text), None, true, false);
                    let e = self.chunk(json!([c]), None);
                    self.out.push_back(e);
                }
            }
            Some(Event::Done(Ok(c))) => {
                self.admission.0.metrics.per_token(
                    &self.model,
                    c.stats.generation_ms,
                    c.stats.completion_tokens,
                );
                let finish = finish_label(c.stats.finish_reason);
                let tail = self.api.choice(None, Some(finish), true, false);
                let e = self.chunk(json!([tail]), None);
                self.out.push_back(e);
                if self.include_usage {
                    let e = self.chunk(json!([]), Some(usage(&c)));
                    self.out.push_back(e);
                }
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
            Some(Event::Done(Err(e))) => {
                let e = ApiError::from(e);
                self.out
                    .push_back(SseEvent::default().data(e.body().to_string()));
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
            None => {
                let e = ApiError::from(EngineError::ModelGone(
                    self.model.clone(),
                    "the model stopped".into(),
                ));
                self.out
                    .push_back(SseEvent::default().data(e.body().to_string()));
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
        }
    }
}

/// A streamed answer in some API's event format: engine events in, SSE
/// events out.
pub(crate) trait SseAnswer: Sized {
    /// The parts [`next_sse`] drives: events ready to send, whether the
    /// answer has ended, the first engine event (read before the response
    /// was chosen), and the request's event stream.
    fn parts(
        &mut self,
    ) -> (
        &mut VecDeque<SseEvent>,
        bool,
        &mut Option<Event>,
        &mut RequestStream,
    );
    /// Turns one engine event (`None`: the model went away) into SSE events.
    fn push(&mut self, event: Option<Event>);
}

/// The next SSE event of `s` (for `futures_util::stream::unfold`).
pub(crate) async fn next_sse<S: SseAnswer>(mut s: S) -> Option<(Result<SseEvent, Infallible>, S)> {
    loop {
        let (out, ended, first, events) = s.parts();
        if let Some(e) = out.pop_front() {
            return Some((Ok(e), s));
        }
        if ended {
            return None;
        }
        let event = match first.take() {
            Some(e) => Some(e),
            None => events.next().await,
        };
        s.push(event);
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

/// The request's first engine event (a token, or its end), timed as its
/// first token; an error before it is an HTTP error, not a stream.
pub(crate) async fn first_event(
    state: &AppState,
    model: &str,
    events: &mut RequestStream,
    arrived: std::time::Instant,
) -> Result<Event, ApiError> {
    match events.next().await {
        Some(Event::Done(Err(e))) => Err(e.into()),
        None => Err(ApiError::internal("the model stopped without answering")),
        Some(event) => {
            if matches!(event, Event::Token { .. }) {
                state.metrics.first_token(model, arrived.elapsed());
            }
            Ok(event)
        }
    }
}

/// Submits and answers: JSON, or SSE with `stream`. An error before the
/// first token is an HTTP error, not a stream.
async fn run(
    state: &Arc<AppState>,
    admission: Admission,
    api: Api,
    common: Common,
    prompt: Prompt,
    breakpoints: Vec<Breakpoint>,
    arrived: std::time::Instant,
) -> Result<Response, ApiError> {
    let options = RequestOptions {
        max_tokens: common.max_tokens.unwrap_or(16),
        sampling: common.sampling,
        stop: common.stop,
        parent_key: None,
        breakpoints,
    };
    let mut events = state.engine.submit(&common.model, prompt, options)?;
    let first = first_event(state, &common.model, &mut events, arrived).await?;
    if !common.stream {
        let completion = match first {
            Event::Done(Ok(c)) => c,
            _ => events.collect().await?,
        };
        state.metrics.per_token(
            &common.model,
            completion.stats.generation_ms,
            completion.stats.completion_tokens,
        );
        return Ok(Json(whole(api, &common.model, &completion)).into_response());
    }
    let streaming = Streaming {
        api,
        id: api.id(events.id),
        model: common.model,
        created: unix_now(),
        include_usage: common.include_usage,
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

// --- handlers ---

/// Counts every answered request by route and status (`/metrics`).
pub(crate) async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state.metrics.request(&endpoint, response.status().as_u16());
    response
}

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .render(&state.engine)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub(crate) async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.models().is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

pub(crate) async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let data: Vec<Value> = state
        .engine
        .models()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": state.started, "owned_by": "erllama"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such route", "not_found")
}

pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    authorize(&state, &headers)?;
    let admission = Admission::enter(&state)?;
    let obj = parse_object(&body)?;
    let mut common = common(&obj, &["max_tokens", "max_completion_tokens"])?;
    let messages = chat_messages(&obj)?;
    let mut schema_grammar: Option<String> = None;
    match field(&obj, "response_format").map(|v| v.get("type").and_then(Value::as_str)) {
        None | Some(Some("text")) => {}
        Some(Some("json_object")) => common.sampling.grammar = Some(JSON_OBJECT_GRAMMAR.into()),
        Some(Some("json_schema")) => {
            let schema = field(&obj, "response_format")
                .and_then(|f| f.get("json_schema"))
                .and_then(|j| j.get("schema"))
                .filter(|s| s.is_object() || s.is_boolean())
                .ok_or_else(|| {
                    ApiError::field(
                        "response_format.json_schema.schema",
                        "response_format json_schema needs json_schema.schema, a JSON Schema \
                         object",
                    )
                })?;
            schema_grammar = Some(schema.to_string());
        }
        Some(_) => {
            return Err(ApiError::field(
                "response_format",
                "response_format type must be text, json_object or json_schema",
            ))
        }
    }
    refuse_unsupported(&obj, &[("tools", json!([])), ("functions", json!([]))])?;
    check_model(&state, &common.model)?;
    let backend = state.engine.backend(&common.model)?;
    let n_ctx = state.engine.info(&common.model)?.n_ctx;
    let (tokens, breakpoints, grammar) = blocking(move || {
        let err = |e| ApiError::from(EngineError::from(e));
        let grammar = match schema_grammar {
            Some(schema) => Some(backend.json_schema_grammar(&schema).map_err(|e| ApiError {
                param: Some("response_format.json_schema.schema".into()),
                ..ApiError::from(EngineError::from(e))
            })?),
            None => None,
        };
        let tokens = backend.chat_tokens(&messages, true).map_err(err)?;
        // The system messages end a piece of their own (docs/server.md).
        let system = messages.iter().take_while(|(r, _)| r == "system").count();
        let mut breakpoints = Vec::new();
        if system > 0 && system < messages.len() {
            let rendered = backend
                .chat_tokens(&messages[..system], false)
                .map_err(err)?;
            let at = tokens
                .iter()
                .zip(&rendered)
                .take_while(|(a, b)| a == b)
                .count();
            if at >= SYSTEM_BREAKPOINT_MIN && at < tokens.len() {
                breakpoints.push(Breakpoint {
                    tokens: at,
                    pin: None,
                });
            }
        }
        Ok((tokens, breakpoints, grammar))
    })
    .await?;
    if grammar.is_some() {
        common.sampling.grammar = grammar;
    }
    if common.max_tokens.is_none() {
        // As much as the context leaves (at least one, so an overlong
        // prompt is reported as such).
        common.max_tokens = Some(n_ctx.saturating_sub(tokens.len()).max(1));
    }
    run(
        &state,
        admission,
        Api::Chat,
        common,
        Prompt::Tokens(tokens),
        breakpoints,
        arrived,
    )
    .await
}

pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    authorize(&state, &headers)?;
    let admission = Admission::enter(&state)?;
    let obj = parse_object(&body)?;
    let common = common(&obj, &["max_tokens"])?;
    refuse_unsupported(
        &obj,
        &[
            ("echo", json!(false)),
            ("best_of", json!(1)),
            ("suffix", json!("")),
        ],
    )?;
    let bad_prompt = || {
        ApiError::field(
            "prompt",
            "prompt must be a string, an array of token ids, or an array of one of either",
        )
    };
    let token_ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad_prompt)
            })
            .collect()
    };
    let prompt = match field(&obj, "prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Prompt::Text(s.clone()),
            [Value::Array(ids)] => Prompt::Tokens(token_ids(ids)?),
            ids if !ids.is_empty() && ids.iter().all(Value::is_number) => {
                Prompt::Tokens(token_ids(ids)?)
            }
            _ => return Err(bad_prompt()),
        },
        None => return Err(ApiError::field("prompt", "prompt is required")),
        Some(_) => return Err(bad_prompt()),
    };
    check_model(&state, &common.model)?;
    run(
        &state,
        admission,
        Api::Text,
        common,
        prompt,
        Vec::new(),
        arrived,
    )
    .await
}

pub(crate) async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let _admission = Admission::enter(&state)?;
    let obj = parse_object(&body)?;
    let model =
        string(&obj, "model")?.ok_or_else(|| ApiError::field("model", "model is required"))?;
    let base64 = match string(&obj, "encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(ApiError::field(
                "encoding_format",
                "encoding_format must be \"float\" or \"base64\"",
            ))
        }
    };
    if field(&obj, "dimensions").is_some() {
        return Err(ApiError::field(
            "dimensions",
            "dimensions is not supported by this server",
        ));
    }
    let bad = || {
        ApiError::field(
            "input",
            "input must be a string, an array of strings, an array of token ids, or an array of \
             token-id arrays, none empty",
        )
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        if items.is_empty() {
            return Err(bad());
        }
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    // Each input: text or token ids.
    let inputs: Vec<Prompt> = match field(&obj, "input") {
        Some(Value::String(s)) if !s.is_empty() => vec![Prompt::Text(s.clone())],
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= 2048 => {
            if items.iter().all(Value::is_number) {
                vec![Prompt::Tokens(ids(items)?)]
            } else {
                items
                    .iter()
                    .map(|v| match v {
                        Value::String(s) if !s.is_empty() => Ok(Prompt::Text(s.clone())),
                        Value::Array(inner) => Ok(Prompt::Tokens(ids(inner)?)),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_, _>>()?
            }
        }
        None => return Err(ApiError::field("input", "input is required")),
        Some(_) => return Err(bad()),
    };
    check_model(&state, &model)?;
    let backend = state.engine.backend(&model)?;
    let n_ctx = state.engine.info(&model)?.n_ctx;
    let (vectors, used) = blocking(move || {
        let mut vectors = Vec::with_capacity(inputs.len());
        let mut used = 0usize;
        for (i, input) in inputs.into_iter().enumerate() {
            let tokens = match input {
                Prompt::Text(t) => backend.tokenize(&t, true).map_err(EngineError::from)?,
                Prompt::Tokens(t) => t,
            };
            if tokens.len() > n_ctx {
                return Err(ApiError {
                    code: Some("context_length_exceeded"),
                    param: Some("input".into()),
                    ..ApiError::bad_request(format!(
                        "input {i} has {} tokens, more than the model's context of {n_ctx}",
                        tokens.len()
                    ))
                });
            }
            used += tokens.len();
            vectors.push(backend.embed(&tokens).map_err(EngineError::from)?);
        }
        Ok((vectors, used))
    })
    .await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                // Little-endian f32s, as OpenAI's base64 encoding is.
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }))
    .into_response())
}
