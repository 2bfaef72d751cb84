//! The prompt encoder: PEFT's `PromptEmbedding` (prompt tuning), `PrefixEncoder` (prefix
//! tuning, with or without the `transform` MLP) and `PromptEncoder` (P-tuning's `mlp_head`).
//! Its output is the prompt the model reads on every forward pass; the trainable tensors are
//! f32 `Var`s named as in PEFT's state dict.
use crate::model::{SoftPrompt, VirtualTokens};
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;

/// The MLP's non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Prefix tuning's `transform`: Linear, Tanh, Linear.
    Tanh,
    /// P-tuning's `mlp_head`: Linear, ReLU, Linear, ReLU, Linear.
    Relu,
}

/// One `torch.nn.Linear`: weight `(out, in)`, bias `(out)`.
pub struct Dense {
    pub weight: Var,
    pub bias: Var,
}

impl Dense {
    /// torch's default init: weight and bias U(±1/sqrt(in)).
    pub fn new(
        rng: &mut StdRng,
        in_f: usize,
        out_f: usize,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_f as f32).sqrt();
        let mut u =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let w = Tensor::from_vec(u(out_f * in_f), (out_f, in_f), dev)?;
        let b = Tensor::from_vec(u(out_f), out_f, dev)?;
        Ok(Dense {
            weight: Var::from_tensor(&w)?,
            bias: Var::from_tensor(&b)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())
    }
}

/// The virtual tokens' embedding table and, where the method has one, the MLP over it.
pub struct PromptEncoder {
    kind: VirtualTokens,
    /// Virtual tokens the model reads per row.
    n: usize,
    /// `(total_virtual_tokens, width)`: PEFT's `embedding.weight`.
    pub embedding: Var,
    /// The MLP's layers and their PEFT module name (`transform`, `mlp_head`).
    pub mlp: Vec<Dense>,
    mlp_name: &'static str,
    activation: Activation,
}

impl std::fmt::Debug for PromptEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptEncoder")
            .field("kind", &self.kind)
            .field("num_virtual_tokens", &self.n)
            .field("embedding", &self.embedding.dims())
            .field("mlp_layers", &self.mlp.len())
            .finish()
    }
}

impl PromptEncoder {
    /// A prompt that is its embedding table.
    pub fn plain(kind: VirtualTokens, n: usize, embedding: Var) -> Self {
        PromptEncoder {
            kind,
            n,
            embedding,
            mlp: Vec::new(),
            mlp_name: "",
            activation: Activation::Relu,
        }
    }

    /// A prompt computed by an MLP from its embedding table.
    pub fn with_mlp(
        kind: VirtualTokens,
        n: usize,
        embedding: Var,
        mlp: Vec<Dense>,
        mlp_name: &'static str,
        activation: Activation,
    ) -> Self {
        PromptEncoder {
            kind,
            n,
            embedding,
            mlp,
            mlp_name,
            activation,
        }
    }

    /// The trainable tensors under PEFT's names after `prompt_encoder.<adapter>.`:
    /// `embedding.weight`, `transform.0.weight`, `mlp_head.2.bias`, ...
    pub fn trainable_params(&self) -> Vec<(String, Var)> {
        let mut out = vec![("embedding.weight".to_string(), self.embedding.clone())];
        for (i, d) in self.mlp.iter().enumerate() {
            // torch.nn.Sequential indices count the activations between the linears.
            let idx = 2 * i;
            out.push((format!("{}.{idx}.weight", self.mlp_name), d.weight.clone()));
            out.push((format!("{}.{idx}.bias", self.mlp_name), d.bias.clone()));
        }
        out
    }

    /// The encoder's output for every row of the table: what PEFT's
    /// `get_prompt_embedding_to_save` saves as `prompt_embeddings`.
    pub fn output(&self) -> candle_core::Result<Tensor> {
        let mut x = self.embedding.as_tensor().clone();
        let last = self.mlp.len().saturating_sub(1);
        for (i, d) in self.mlp.iter().enumerate() {
            x = d.forward(&x)?;
            if i < last {
                x = match self.activation {
                    Activation::Tanh => x.tanh()?,
                    Activation::Relu => x.relu()?,
                };
            }
        }
        Ok(x)
    }
}

impl SoftPrompt for PromptEncoder {
    fn kind(&self) -> VirtualTokens {
        self.kind
    }
    fn num_virtual_tokens(&self) -> usize {
        self.n
    }
    fn values(&self) -> crate::Result<Tensor> {
        let out = self.output()?;
        // An encoder-decoder's table holds a prompt per stack; a decoder reads the first.
        Ok(out.narrow(0, 0, self.n)?)
    }
}
