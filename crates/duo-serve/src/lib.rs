//! `duo serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.
//!
//! * [`openai`] parses and checks request bodies and builds response objects;
//! * [`http`] is the axum router: authentication, body limits, the endpoints, server-sent
//!   events, and the bridge from engine events to HTTP;
//! * [`metrics`] renders Prometheus text;
//! * [`error`] is the one error type, answered as the OpenAI error object.
//!
//! The server talks to the engine only through [`duo_engine::Request`] values and the
//! [`duo_engine::Event`]s they produce; the engine runs on its own thread, so HTTP work
//! never waits for a forward pass and a forward pass never waits for a slow client.

pub mod error;
pub mod http;
pub mod metrics;
pub mod openai;

pub use error::{Result, ServeError};
pub use http::{router, serve, AppState, Ready, ServeConfig};
