//! Extra keys: what besides the tokens goes into a block's hash (LoRA adapter,
//! multimodal items, `cache_salt`), in the format of each vLLM era.

use serde::{Deserialize, Serialize};

use crate::preimage::PyValue;
use crate::version::ExtraKeyEra;

/// A LoRA adapter as vLLM's `LoRARequest` knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraRef {
    /// `lora_name` (hashed from 0.11.1 on).
    pub name: String,
    /// `lora_int_id` (hashed ≤ 0.11.0; unstable across servers).
    #[serde(default)]
    pub int_id: i64,
    /// `lora_path` (hashed from 0.31 on; not published in events).
    #[serde(default)]
    pub path: String,
}

/// A multimodal item's placeholder in the prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmItem {
    /// `mm_feature.identifier` (the mm hash).
    pub identifier: String,
    /// First token of the placeholder.
    pub offset: usize,
    /// Number of placeholder tokens.
    pub length: usize,
}

/// Everything about a request, besides its tokens, that changes its block hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestExtras {
    pub lora: Option<LoraRef>,
    pub cache_salt: Option<String>,
    /// Sorted by offset, as vLLM keeps them.
    #[serde(default)]
    pub mm: Vec<MmItem>,
}

impl RequestExtras {
    pub fn is_empty(&self) -> bool {
        self.lora.is_none() && self.cache_salt.is_none() && self.mm.is_empty()
    }
}

/// Produces each block's extra keys in order, following vLLM's
/// `generate_block_hash_extra_keys` (LoRA, then mm items, then salt on block 0).
pub struct ExtraKeyGen<'a> {
    era: ExtraKeyEra,
    extras: &'a RequestExtras,
    mm_idx: usize,
}

impl<'a> ExtraKeyGen<'a> {
    pub fn new(era: ExtraKeyEra, extras: &'a RequestExtras) -> Self {
        Self { era, extras, mm_idx: 0 }
    }

    /// Extra keys of the block covering tokens `[start, end)`; `None` when empty.
    /// Blocks must be visited in order.
    pub fn block(&mut self, start: usize, end: usize) -> Option<Vec<PyValue>> {
        if self.extras.is_empty() {
            return None;
        }
        let mut keys = Vec::new();
        if let Some(lora) = &self.extras.lora {
            keys.push(match self.era {
                ExtraKeyEra::IntId => PyValue::Int(lora.int_id),
                ExtraKeyEra::Name | ExtraKeyEra::NameAndOffset => PyValue::Str(lora.name.clone()),
                ExtraKeyEra::Tagged => PyValue::Tuple(vec![
                    PyValue::Tag("lora"),
                    PyValue::Str(lora.name.clone()),
                    PyValue::Str(lora.path.clone()),
                ]),
            });
        }
        self.mm_keys(start, end, &mut keys);
        if start == 0 {
            if let Some(salt) = self.extras.cache_salt.as_deref().filter(|s| !s.is_empty()) {
                keys.push(match self.era {
                    ExtraKeyEra::Tagged => {
                        PyValue::Tuple(vec![PyValue::Tag("cache_salt"), PyValue::Str(salt.to_string())])
                    }
                    _ => PyValue::Str(salt.to_string()),
                });
            }
        }
        (!keys.is_empty()).then_some(keys)
    }

    /// `_gen_mm_extra_hash_keys`: a cursor over the offset-sorted items.
    fn mm_keys(&mut self, start: usize, end: usize, keys: &mut Vec<PyValue>) {
        let items = &self.extras.mm;
        while let Some(item) = items.get(self.mm_idx) {
            let (off, len) = (item.offset, item.length);
            if end <= off {
                break; // the block has not reached this item
            }
            if start > off + len {
                self.mm_idx += 1; // the block is past this item
                continue;
            }
            let rel = off as i64 - start as i64;
            keys.push(match self.era {
                ExtraKeyEra::IntId | ExtraKeyEra::Name => PyValue::Str(item.identifier.clone()),
                ExtraKeyEra::NameAndOffset => {
                    PyValue::Tuple(vec![PyValue::Str(item.identifier.clone()), PyValue::Int(rel)])
                }
                ExtraKeyEra::Tagged => {
                    PyValue::Tuple(vec![PyValue::Tag("mm"), PyValue::Str(item.identifier.clone()), PyValue::Int(rel)])
                }
            });
            if end >= off + len {
                self.mm_idx += 1; // the item ends in this block; the next may start here too
            } else {
                break;
            }
        }
    }
}
