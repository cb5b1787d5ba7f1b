//! The HTTP surface: routes, API-key check, body limit, and the bridge between engine
//! events and responses (whole JSON objects or server-sent events).
//!
//! A request is refused as early as possible and before any work: 503 while the model
//! loads, 401 without the key, 429 when the queue is full (before tokenising), 413 over
//! the body limit, 400 for bad fields or a prompt that does not fit. A client that goes
//! away drops its response stream, which closes the channel the engine writes to; the
//! engine notices at its next step and frees the sequence's KV cache.

use crate::error::{Result, ServeError};
use crate::metrics::Metrics;
use crate::openai::{finish_reason, logprobs_json, usage, Endpoint, GenerationRequest, Limits, Prompt, TokenLogprobs};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use duo_engine::{BatchEngine, Event, EventSink, FinishReason, Request};
use duo_engine::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Settings fixed for the server's life.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model's name in `/v1/models` and responses.
    pub model_id: String,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Bounds on request fields.
    pub limits: Limits,
    /// Longest wait for a request's headers, counted from the moment the connection waits
    /// for a request (so also the idle time of a kept-alive connection): `--timeout-keep-alive`.
    pub header_timeout: std::time::Duration,
    /// Longest wait for a request's whole body once its headers are in: `--timeout-read`.
    pub body_timeout: std::time::Duration,
    /// Seed for requests that give none (`--seed`); `None`: a fresh seed per request, as
    /// OpenAI's API samples.
    pub seed: Option<u64>,
}

/// What exists once the model is loaded.
pub struct Ready {
    /// The model (shared with the engine thread).
    pub model: Arc<Engine>,
    /// The engine.
    pub engine: BatchEngine,
}

/// Shared by every handler.
pub struct AppState {
    /// Settings.
    pub config: ServeConfig,
    /// Set once the model has loaded; until then the API answers 503.
    pub ready: OnceLock<Ready>,
    /// Latency histograms and counters.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// A state whose model is still loading.
    pub fn new(config: ServeConfig) -> Arc<Self> {
        Arc::new(Self { config, ready: OnceLock::new(), metrics: Arc::new(Metrics::default()) })
    }

    fn ready(&self) -> Result<&Ready> {
        self.ready.get().ok_or_else(ServeError::loading)
    }
}

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async { ServeError::not_found("no such route", "not_found") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .with_state(state)
}

/// Reads a request's whole body before any route sees it: a `Content-Length` over the limit
/// is answered with 413 at once (nothing read), a body that does not arrive within the read
/// timeout with 408, a body that grows past the limit with 413.
async fn read_body(State(state): State<Arc<AppState>>, request: HttpRequest, next: Next) -> Response {
    let limit = state.config.max_body_bytes;
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ServeError::too_large(limit).into_response();
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(state.config.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => ServeError::timeout(state.config.body_timeout).into_response(),
        Ok(Err(_)) => ServeError::too_large(limit).into_response(),
        Ok(Ok(bytes)) => next.run(HttpRequest::from_parts(parts, axum::body::Body::from(bytes))).await,
    }
}

/// Serves `router` on `listener` until `shutdown` resolves: one HTTP/1.1 connection per
/// task, with the header (and keep-alive idle) timeout of `config` enforced by hyper's
/// timer, so a client that opens a connection and sends nothing is dropped. Sockets send
/// without Nagle's delay: a streamed token is a small write that must leave at once, not
/// wait for the acknowledgement of the previous one (up to the peer's delayed-ACK time).
pub async fn serve(listener: tokio::net::TcpListener, router: Router, header_timeout: std::time::Duration, shutdown: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait a moment, keep serving.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!("connection closed: {e}");
            }
        });
    }
}

/// Hashes both sides first, so the comparison takes the same time whatever the key's
/// length or content.
fn keys_match(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(state): State<Arc<AppState>>, request: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        // The scheme is case-insensitive (RFC 9110 §11.1): `Bearer`, `bearer`, `BEARER`.
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        if !keys_match(given, key) {
            return ServeError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.ready.get() {
        Some(r) if r.engine.is_alive() => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Some(_) => {
            let mut e = ServeError::internal("the engine has stopped");
            e.status = StatusCode::SERVICE_UNAVAILABLE;
            e.into_response()
        }
        None => ServeError::loading().into_response(),
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>> {
    let ready = state.ready()?;
    let context = ready.model.config().context_length;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": state.config.model_id,
            "object": "model",
            "created": now(),
            "owned_by": "duo",
            "max_model_len": context,
            "context_length": context,
        }],
    })))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response> {
    let ready = state.ready()?;
    let text = state.metrics.render(&state.config.model_id, ready.engine.stats(), ready.engine.config().kv_budget);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

fn body_bytes(body: std::result::Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes> {
    body.map_err(|e| if e.status() == StatusCode::PAYLOAD_TOO_LARGE { ServeError::too_large(limit) } else { ServeError::bad_request(e.body_text(), "invalid_body") })
}

async fn tokenize(State(state): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Result<Json<Value>> {
    let ready = state.ready()?;
    let body = body_bytes(body, state.config.max_body_bytes)?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ServeError::bad_request(format!("the body is not valid JSON: {e}"), "invalid_json"))?;
    let endpoint = if v.get("messages").is_some() { Endpoint::Chat } else { Endpoint::Completion };
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        _ if endpoint == Endpoint::Chat => GenerationRequest::parse(Endpoint::Chat, &body, &state.config.limits, Some(0))?.prompt,
        _ => return Err(ServeError::invalid("prompt", "`prompt` must be a string (or give `messages`)")),
    };
    let tokens = tokens_of(&ready.model, &prompt, None)?;
    let context = ready.model.config().context_length;
    Ok(Json(json!({"count": tokens.len(), "max_model_len": context, "tokens": tokens})))
}

fn tokens_of(model: &Engine, prompt: &Prompt, tools: Option<&Value>) -> Result<Vec<u32>> {
    let internal = |e: duo_model::ModelError| ServeError::internal(e.to_string());
    match prompt {
        Prompt::Text(t) => model.tokenizer.encode(t, true).map_err(internal),
        Prompt::Tokens(ids) => {
            let vocab = model.config().vocab_size;
            match ids.iter().find(|&&id| id as usize >= vocab) {
                Some(bad) => Err(ServeError::invalid("prompt", format!("token id {bad} is outside the vocabulary of {vocab}"))),
                None => Ok(ids.clone()),
            }
        }
        Prompt::Chat(messages) => {
            let template = model.template.as_ref().ok_or_else(|| ServeError::bad_request("this model ships no chat template; use /v1/completions", "no_chat_template"))?;
            let pieces = template.render_pieces_with(messages, tools, true).map_err(|e| ServeError::invalid("messages", e.to_string()))?;
            model.tokenizer.encode_chat(&pieces).map_err(internal)
        }
    }
}

async fn completions(state: State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Result<Response> {
    generate(state, Endpoint::Completion, body).await
}

async fn chat_completions(state: State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Result<Response> {
    generate(state, Endpoint::Chat, body).await
}

/// Forwards engine events to the handler and records latencies as tokens are made.
struct HttpSink {
    /// The response's channel, shared by the request's choices (`n`): events are tagged
    /// with their choice.
    tx: mpsc::UnboundedSender<(usize, Event)>,
    /// This sink's choice.
    choice: usize,
    metrics: Arc<Metrics>,
    arrived: Instant,
    last_token: Option<Instant>,
    /// `Done` or `Failed` was sent: the request did not end by its client leaving.
    ended: bool,
    /// The engine took the request (set after `submit` returns): a request refused at
    /// submission (429, 400) was never running, so dropping it is no abort.
    accepted: Arc<std::sync::atomic::AtomicBool>,
}

impl EventSink for HttpSink {
    fn send(&mut self, event: Event) -> bool {
        let now = Instant::now();
        match &event {
            Event::Token { .. } => {
                match self.last_token {
                    None => self.metrics.ttft.observe((now - self.arrived).as_secs_f64()),
                    Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
                }
                self.last_token = Some(now);
            }
            Event::Done { finish_reason, .. } => {
                self.ended = true;
                self.metrics.e2e.observe((now - self.arrived).as_secs_f64());
                let c = match finish_reason {
                    FinishReason::Stop => &self.metrics.finished_stop,
                    FinishReason::Length => &self.metrics.finished_length,
                    FinishReason::Cancelled => &self.metrics.finished_abort,
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
            Event::Failed(_) => {
                self.ended = true;
                self.metrics.finished_abort.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.tx.send((self.choice, event)).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        // A running request dropped before Done or Failed (its client went away) counts as aborted.
        if !self.ended && self.accepted.load(Ordering::SeqCst) {
            self.metrics.finished_abort.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn generate(State(state): State<Arc<AppState>>, endpoint: Endpoint, body: std::result::Result<Bytes, BytesRejection>) -> Result<Response> {
    let arrived = Instant::now();
    let ready = state.ready()?;
    if !ready.engine.is_alive() {
        return Err(ServeError::internal("the engine has stopped; restart the server"));
    }
    if ready.engine.queue_full() {
        state.metrics.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
        return Err(ServeError::queue_full(ready.engine.stats().waiting.load(Ordering::SeqCst)));
    }
    let body = body_bytes(body, state.config.max_body_bytes)?;
    let limits = state.config.limits;
    let mut req = GenerationRequest::parse(endpoint, &body, &limits, state.config.seed)?;
    if !req.ignored.is_empty() {
        tracing::warn!(fields = ?req.ignored, "ignoring request fields duo does not use");
    }
    if let Some(m) = &req.model {
        if m != &state.config.model_id {
            return Err(ServeError::not_found(format!("the model `{m}` does not exist; this server serves `{}`", state.config.model_id), "model_not_found"));
        }
    }
    // Tokenising (and rendering the template) is CPU work: off the async workers.
    let (model, text, tools) = (ready.model.clone(), req.prompt.clone(), req.tools.clone());
    let prompt = tokio::task::spawn_blocking(move || tokens_of(&model, &text, tools.as_ref())).await.map_err(|e| ServeError::internal(e.to_string()))??;
    let context = ready.model.config().context_length;
    req.resolve_max_tokens(prompt.len(), context, ready.engine.max_new_tokens_within_budget(prompt.len()), &limits);
    // `n` choices are `n` requests of the engine: choice `i` samples with seed + i, and all
    // events come back on one channel tagged with their choice (a client that leaves closes
    // it for every choice).
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Event)>();
    for i in 0..req.n {
        let accepted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink = Box::new(HttpSink { tx: tx.clone(), choice: i, metrics: state.metrics.clone(), arrived, last_token: None, ended: false, accepted: accepted.clone() });
        let params = duo_engine::SamplingParams { seed: req.params.seed.wrapping_add(i as u64), ..req.params.clone() };
        ready.engine.submit(Request { prompt: prompt.clone(), params, top_logprobs: req.logprobs, sink }).map_err(|e| {
            if matches!(e, duo_engine::EngineError::QueueFull { .. }) {
                state.metrics.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
            }
            ServeError::from(e)
        })?;
        accepted.store(true, Ordering::SeqCst);
    }
    drop(tx);
    let reply = Reply {
        endpoint,
        id: format!("{}-{:016x}", if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }, request_id()),
        created: now(),
        model: state.config.model_id.clone(),
        model_ref: ready.model.clone(),
        logprobs: req.logprobs.is_some(),
        echo: None,
        tool_call: req.forced_tool,
    };
    let reply = if req.echo { Reply { echo: Some(prompt_text(&ready.model, &req.prompt)?), ..reply } } else { reply };
    if req.stream {
        Ok(stream_response(reply, rx, req.n, req.include_usage))
    } else {
        whole_response(reply, rx, req.n).await
    }
}

/// What every response of one request shares.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    model_ref: Arc<Engine>,
    logprobs: bool,
    /// The prompt's text, sent before the completion (`echo`).
    echo: Option<String>,
    /// The output is a forced tool call, returned as `tool_calls`.
    tool_call: bool,
}

impl Reply {
    fn token_logprobs(&self, id: u32, lp: &duo_engine::TokenLogprob) -> TokenLogprobs {
        let text = |t: u32| self.model_ref.tokenizer.decode(&[t]).unwrap_or_default();
        TokenLogprobs { token: text(id), logprob: lp.logprob, top: lp.top.iter().map(|&(t, l)| (text(t), l)).collect() }
    }

    /// The `object` of a whole response and of a streamed chunk.
    fn objects(&self) -> (&'static str, &'static str) {
        match self.endpoint {
            Endpoint::Chat => ("chat.completion", "chat.completion.chunk"),
            Endpoint::Completion => ("text_completion", "text_completion"),
        }
    }

    /// One streamed chunk: `text` as a delta, with optional logprobs and finish reason.
    fn chunk(&self, index: usize, text: &str, first: bool, logprobs: Option<Value>, finish: Option<&str>, include_usage: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if !text.is_empty() || first {
                    delta["content"] = json!(text);
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completion => json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        };
        let mut v = json!({"id": self.id, "object": self.objects().1, "created": self.created, "model": self.model, "choices": [choice]});
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

/// The text of a completions prompt, for `echo`.
fn prompt_text(model: &Engine, prompt: &Prompt) -> Result<String> {
    match prompt {
        Prompt::Text(t) => Ok(t.clone()),
        Prompt::Tokens(ids) => model.tokenizer.decode(ids).map_err(|e| ServeError::internal(e.to_string())),
        Prompt::Chat(_) => Err(ServeError::invalid("echo", "`echo` is a completions field")),
    }
}

async fn whole_response(reply: Reply, mut rx: mpsc::UnboundedReceiver<(usize, Event)>, n: usize) -> Result<Response> {
    let mut texts = vec![reply.echo.clone().unwrap_or_default(); n];
    let mut lps: Vec<Vec<TokenLogprobs>> = vec![Vec::new(); n];
    let mut choices: Vec<Option<Value>> = vec![None; n];
    let mut completion_tokens = 0;
    while let Some((i, event)) = rx.recv().await {
        match event {
            Event::Token { id, text: t, logprob } => {
                texts[i].push_str(&t);
                if let Some(lp) = logprob.filter(|_| reply.logprobs) {
                    lps[i].push(reply.token_logprobs(id, &lp));
                }
            }
            Event::Done { finish_reason: reason, text: t, prompt_tokens, completion_tokens: c } => {
                texts[i].push_str(&t);
                completion_tokens += c;
                let logprobs = reply.logprobs.then(|| logprobs_json(reply.endpoint, &lps[i], 0));
                let text = std::mem::take(&mut texts[i]);
                let call = reply.tool_call.then(|| serde_json::from_str::<Value>(&text).ok()).flatten().filter(|v| v["name"].is_string());
                choices[i] = Some(match (reply.endpoint, call) {
                    (Endpoint::Chat, Some(call)) => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": null, "tool_calls": [{
                            "id": format!("call_{:016x}", request_id()),
                            "type": "function",
                            "function": {"name": call["name"], "arguments": call["arguments"].to_string()},
                        }]},
                        "logprobs": logprobs,
                        "finish_reason": "tool_calls",
                    }),
                    (Endpoint::Chat, None) => json!({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish_reason(reason)}),
                    (Endpoint::Completion, _) => json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}),
                });
                if choices.iter().all(Option::is_some) {
                    return Ok(Json(json!({
                        "id": reply.id, "object": reply.objects().0, "created": reply.created, "model": reply.model,
                        "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
                    }))
                    .into_response());
                }
            }
            Event::Failed(message) => return Err(ServeError::internal(message)),
        }
    }
    Err(ServeError::internal("the engine stopped before the request finished"))
}

fn stream_response(reply: Reply, rx: mpsc::UnboundedReceiver<(usize, Event)>, n: usize, include_usage: bool) -> Response {
    /// Where one choice stands.
    #[derive(Clone)]
    struct Choice {
        first: bool,
        offset: usize,
        echo: Option<String>,
        done: bool,
    }
    struct St {
        reply: Reply,
        rx: mpsc::UnboundedReceiver<(usize, Event)>,
        pending: VecDeque<SseEvent>,
        choices: Vec<Choice>,
        completion_tokens: usize,
        done: bool,
        include_usage: bool,
    }
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let choice = Choice { first: true, offset: 0, echo: reply.echo.clone(), done: false };
    let st = St { reply, rx, pending: VecDeque::new(), choices: vec![choice; n], completion_tokens: 0, done: false, include_usage };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some((i, Event::Token { id, text, logprob })) => {
                    let c = &mut st.choices[i];
                    let lp = logprob.filter(|_| st.reply.logprobs).map(|lp| logprobs_json(st.reply.endpoint, &[st.reply.token_logprobs(id, &lp)], c.offset));
                    if text.is_empty() && lp.is_none() && !c.first {
                        continue;
                    }
                    let text = match c.echo.take() {
                        Some(prompt) => prompt + &text,
                        None => text,
                    };
                    c.offset += text.len();
                    st.pending.push_back(data(st.reply.chunk(i, &text, c.first, lp, None, st.include_usage)));
                    c.first = false;
                }
                Some((i, Event::Done { finish_reason: reason, text, prompt_tokens, completion_tokens })) => {
                    let c = &mut st.choices[i];
                    // A completion that ended before its first token still echoes its prompt.
                    let text = match c.echo.take() {
                        Some(prompt) => prompt + &text,
                        None => text,
                    };
                    st.pending.push_back(data(st.reply.chunk(i, &text, c.first, None, Some(finish_reason(reason)), st.include_usage)));
                    c.done = true;
                    st.completion_tokens += completion_tokens;
                    if st.choices.iter().all(|c| c.done) {
                        if st.include_usage {
                            let r = &st.reply;
                            st.pending.push_back(data(json!({
                                "id": r.id, "object": r.objects().1, "created": r.created, "model": r.model, "choices": [],
                                "usage": usage(prompt_tokens, st.completion_tokens),
                            })));
                        }
                        st.pending.push_back(SseEvent::default().data("[DONE]"));
                        st.done = true;
                    }
                }
                Some((_, Event::Failed(message))) => {
                    st.pending.push_back(data(ServeError::internal(message).body()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                None => {
                    st.pending.push_back(data(ServeError::internal("the engine stopped before the request finished").body()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn request_id() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    now().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(keys_match("secret", "secret"));
        assert!(!keys_match("secret ", "secret"));
        assert!(!keys_match("", "secret"));
    }
}
