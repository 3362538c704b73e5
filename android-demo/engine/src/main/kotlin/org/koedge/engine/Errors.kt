package org.koedge.engine

/**
 * Everything a user can cause (a wrong folder, a damaged bundle, a prompt too long) is a [KoedgeException]
 * with a one-line message the app shows as is; anything else is a bug. The subclasses say what went wrong:
 *
 * - [NotABundleException]: the folder is missing, has no `koedge.json`, or the manifest is not a koedge manifest.
 * - [CorruptBundleException]: the manifest is unreadable, or a file differs from the size it records
 *   (a truncated `model.onnx.data`), or onnxruntime cannot load the graph.
 * - [ContractMismatchException]: the manifest's inputs/outputs are not the graph's.
 * - [UnsupportedTokenizerException]: `tokenizer.json` uses a model, normalizer, pre-tokenizer or decoder
 *   this engine does not implement (it never guesses: it refuses).
 * - [PromptException]: empty prompt, or longer than the model's context.
 * - [MemoryRefusedException]: the bundle's predicted memory exceeds what the device has available.
 */
open class KoedgeException(message: String, cause: Throwable? = null) : Exception(message, cause)

class NotABundleException(message: String) : KoedgeException(message)
class CorruptBundleException(message: String, cause: Throwable? = null) : KoedgeException(message, cause)
class ContractMismatchException(message: String) : KoedgeException(message)
class UnsupportedTokenizerException(message: String) : KoedgeException(message)
class PromptException(message: String) : KoedgeException(message)
class MemoryRefusedException(message: String, val neededBytes: Long, val availableBytes: Long) : KoedgeException(message)
