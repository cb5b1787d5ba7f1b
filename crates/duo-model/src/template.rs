//! Chat templates: the Jinja template shipped with the model, rendered by minijinja in
//! a sandbox — no file system, a fuel limit on the work a template may do, Python string
//! methods through `minijinja-contrib`, and HF's `raise_exception`.
//!
//! Templates only ever come from the model files, never from a request.

use crate::error::{ModelError, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

/// Instructions a template may execute (minijinja fuel): generous for real templates,
/// bounded for hostile ones.
const FUEL: u64 = 5_000_000;

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are exposed as `bos_token`/`eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_owned()).map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(Self { env, bos: bos.into(), eos: eos.into() })
    }

    /// Renders a conversation; with `add_generation_prompt` the assistant's turn is opened.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| ModelError::Template(e.to_string()))?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let m = vec![Message { role: "user".into(), content: "Hi".into() }];
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role == 'bad' %}{{ raise_exception('roles must alternate') }}{% endif %}{{ messages[0].content.strip() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let ok = vec![Message { role: "user".into(), content: "  x  ".into() }];
        assert_eq!(t.render(&ok, false).unwrap(), "x");
        let bad = vec![Message { role: "bad".into(), content: "x".into() }];
        assert!(t.render(&bad, false).unwrap_err().to_string().contains("roles must alternate"));
    }

    #[test]
    fn runaway_templates_are_stopped() {
        let src = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert!(t.render(&[], false).is_err());
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
