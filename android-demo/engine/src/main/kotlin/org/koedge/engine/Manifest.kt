package org.koedge.engine

import java.io.File

/** One input or output of the graph as the manifest lists it (dtype is a numpy name: int64, float32, float16). */
class TensorSpec(val name: String, val dtype: String, val shape: List<Any?>)

/** How to drive the graph (runtime/bundle.py `IOContract`): names, KV layout and the optional inputs. */
class IOContract(
    val inputs: List<TensorSpec>,
    val outputs: List<TensorSpec>,
    val pastKey: String,
    val pastValue: String,
    val presentKey: String,
    val presentValue: String,
    val kvDtype: String,
    val logits: String,
    val usesPositionIds: Boolean,
    val logitsToKeep: String?,
    val kvSharedBuffer: Boolean,
    /** Input telling the sliding-window layers where their KV views start (0: whole buffers); see Engine.call. */
    val kvWindowOffset: String? = null,
    val kvWindowLayers: List<Int> = emptyList(),
    val kvWindow: Int = 0,
) {
    fun pastNames(layers: Int): List<String> = (0 until layers).flatMap { listOf(fill(pastKey, it), fill(pastValue, it)) }
    fun presentNames(layers: Int): List<String> = (0 until layers).flatMap { listOf(fill(presentKey, it), fill(presentValue, it)) }
    private fun fill(pattern: String, layer: Int) = pattern.replace("{layer}", layer.toString())
}

class ModelInfo(
    val name: String,
    val source: String,
    val architecture: String,
    val numLayers: Int,
    val numAttentionHeads: Int,
    val numKvHeads: Int,
    val headDim: Int,
    val hiddenSize: Int,
    val vocabSize: Int,
    val maxPositions: Int,
    val parameters: Long,
    val slidingWindow: Int?,
)

class SpecialTokens(val bosTokenId: Int?, val eosTokenIds: List<Int>, val padTokenId: Int?, val chatTemplate: Boolean,
                    val chatFormat: ChatFormat? = null)

/** The chat template's turns as plain text (the exporter renders them once: runtime/chat.py), and where a reply stops. */
class ChatFormat(val firstUserPrefix: String, val assistantPrefix: String, val nextUserPrefix: String,
                 val endOfTurnIds: List<Int>) {
    /** user, assistant, user, ... (an odd count): the text that asks for the next reply; the template writes any BOS. */
    fun prompt(turns: List<String>): String {
        if (turns.size % 2 != 1) throw PromptException("a chat prompt ends with a user turn")
        val text = StringBuilder(firstUserPrefix).append(turns[0]).append(assistantPrefix)
        for (i in 1 until turns.size step 2) {
            text.append(turns[i]).append(nextUserPrefix).append(turns[i + 1]).append(assistantPrefix)
        }
        return text.toString()
    }
}

class PassRecord(val name: String, val config: Map<String, Any?>, val seconds: Double, val results: Map<String, Any?>)

class FileRecord(val bytes: Long, val sha256: String)

/**
 * `koedge.json`, the contract between the exporter and every runner (runtime/bundle.py). The engine reads
 * names and shapes from here and never guesses them from file names.
 */
class Manifest(
    val model: ModelInfo,
    val tokens: SpecialTokens,
    val io: IOContract,
    val onnxFile: String,
    val passes: List<PassRecord>,
    val files: Map<String, FileRecord>,
    val quantizedWeights: Boolean,
) {
    /** Bytes of the ONNX files (graph + external data): what must be resident to run. */
    fun weightBytes(): Long = files.filterKeys { name ->
        name.endsWith(".onnx") || name.endsWith(".onnx.data") || name.endsWith(".onnx_data") || name.endsWith(".data")
    }.values.sumOf { it.bytes }

    /** Whether onnxruntime should pre-pack weights (as runtime/model.py decides: quantized bundles only). */
    val prepacking: Boolean get() = quantizedWeights || passes.any { it.name.startsWith("quantize") }

    /** Accuracy and memory figures the exporter measured (validate / eval passes), for the model card. */
    fun measured(): Map<String, String> {
        val out = LinkedHashMap<String, String>()
        for (record in passes) {
            for ((key, value) in record.results) {
                if (value is Number || value is String || value is Boolean) out["${record.name}.$key"] = value.toString()
            }
        }
        return out
    }

    companion object {
        const val FILE = "koedge.json"
        const val FORMAT = "koedge-bundle"

        /** Read and check `folder/koedge.json`; throws [NotABundleException] or [CorruptBundleException]. */
        fun read(folder: File): Manifest {
            if (!folder.isDirectory) throw NotABundleException("$folder is not a folder")
            val file = File(folder, FILE)
            if (!file.isFile) throw NotABundleException("$folder is not a koedge bundle (no $FILE)")
            val data = try {
                Json.parse(file.readText(Charsets.UTF_8)).obj(FILE)
            } catch (err: IllegalArgumentException) {
                throw CorruptBundleException("$file is corrupt: ${err.message}")
            }
            if (data["format"] != FORMAT) throw NotABundleException("$file is not a koedge manifest (format=${data["format"]})")
            val manifest = try {
                parse(data)
            } catch (err: RuntimeException) { // a missing field or a wrong type
                throw CorruptBundleException("$file is corrupt: ${err.message}")
            }
            if (!File(folder, manifest.onnxFile).isFile) {
                throw CorruptBundleException("bundle $folder lacks its model file ${manifest.onnxFile}")
            }
            return manifest
        }

        private fun spec(item: Any?): TensorSpec {
            val map = item.obj("tensor spec")
            return TensorSpec(map["name"].str("name"), map["dtype"].str("dtype"), map["shape"].arr("shape"))
        }

        private fun need(map: Map<String, Any?>, key: String): Any? =
            if (key in map) map[key] else throw IllegalArgumentException("missing field '$key'")

        internal fun parse(data: Map<String, Any?>): Manifest {
            val model = need(data, "model").obj("model")
            val tokens = need(data, "tokens").obj("tokens")
            val io = need(data, "io").obj("io")
            val info = ModelInfo(
                name = need(model, "name").str("model.name"),
                source = (model["source"] as? String) ?: "",
                architecture = need(model, "architecture").str("model.architecture"),
                numLayers = need(model, "num_layers").int("num_layers"),
                numAttentionHeads = need(model, "num_attention_heads").int("num_attention_heads"),
                numKvHeads = need(model, "num_kv_heads").int("num_kv_heads"),
                headDim = need(model, "head_dim").int("head_dim"),
                hiddenSize = need(model, "hidden_size").int("hidden_size"),
                vocabSize = need(model, "vocab_size").int("vocab_size"),
                maxPositions = need(model, "max_positions").int("max_positions"),
                parameters = (model["parameters"] as? Number)?.toLong() ?: 0L,
                slidingWindow = (model["sliding_window"] as? Number)?.toInt(),
            )
            val special = SpecialTokens(
                bosTokenId = (tokens["bos_token_id"] as? Number)?.toInt(),
                eosTokenIds = need(tokens, "eos_token_ids").arr("eos_token_ids").map { it.int("eos id") },
                padTokenId = (tokens["pad_token_id"] as? Number)?.toInt(),
                chatTemplate = tokens["chat_template"] == true,
                chatFormat = tokens["chat_format"]?.obj("tokens.chat_format")?.let { chat ->
                    ChatFormat(
                        firstUserPrefix = need(chat, "first_user_prefix").str("first_user_prefix"),
                        assistantPrefix = need(chat, "assistant_prefix").str("assistant_prefix"),
                        nextUserPrefix = need(chat, "next_user_prefix").str("next_user_prefix"),
                        endOfTurnIds = chat["end_of_turn_ids"]?.arr("end_of_turn_ids")?.map { it.int("end_of_turn id") }
                            ?: emptyList(),
                    )
                },
            )
            val contract = IOContract(
                inputs = need(io, "inputs").arr("io.inputs").map(::spec),
                outputs = need(io, "outputs").arr("io.outputs").map(::spec),
                pastKey = (io["past_key"] as? String) ?: "past_key_values.{layer}.key",
                pastValue = (io["past_value"] as? String) ?: "past_key_values.{layer}.value",
                presentKey = (io["present_key"] as? String) ?: "present.{layer}.key",
                presentValue = (io["present_value"] as? String) ?: "present.{layer}.value",
                kvDtype = (io["kv_dtype"] as? String) ?: "float32",
                logits = (io["logits"] as? String) ?: "logits",
                usesPositionIds = io["uses_position_ids"] == true,
                logitsToKeep = io["logits_to_keep"] as? String,
                kvSharedBuffer = io["kv_shared_buffer"] == true,
                kvWindowOffset = io["kv_window_offset"] as? String,
                kvWindowLayers = (io["kv_window_layers"] as? List<*>)?.map { (it as Number).toInt() } ?: emptyList(),
                kvWindow = (io["kv_window"] as? Number)?.toInt() ?: 0,
            )
            val passes = (data["passes"] as? List<*> ?: emptyList<Any?>()).map {
                val record = it.obj("pass")
                PassRecord(
                    name = record["name"].str("pass name"),
                    config = (record["config"] as? Map<*, *>)?.obj("config") ?: emptyMap(),
                    seconds = (record["seconds"] as? Number)?.toDouble() ?: 0.0,
                    results = (record["results"] as? Map<*, *>)?.obj("results") ?: emptyMap(),
                )
            }
            val files = LinkedHashMap<String, FileRecord>()
            for ((name, value) in (data["files"] as? Map<*, *>)?.obj("files") ?: emptyMap()) {
                val record = value.obj("file record")
                files[name] = FileRecord((record["bytes"] as Number).toLong(), (record["sha256"] as? String) ?: "")
            }
            return Manifest(info, special, contract, need(data, "onnx_file").str("onnx_file"), passes, files,
                data["quantized_weights"] == true)
        }
    }
}

/** What a run should need (runtime/memory.py `predict_budget`): weights + KV cache + the biggest activations. */
class Budget(val weights: Long, val kvCache: Long, val activations: Long) {
    val total: Long get() = weights + kvCache + activations

    companion object {
        /** The same prediction as the Python runtime for one prefill of [promptTokens] then [newTokens] steps. */
        fun predict(manifest: Manifest, promptTokens: Int, newTokens: Int): Budget {
            val info = manifest.model
            val chunk = prefillChunk(manifest)
            val rows = if (chunk == null) promptTokens.toLong() else minOf(promptTokens, chunk).toLong()
            val logits = (1.3 * (if (manifest.io.logitsToKeep != null) 1L else rows) * info.vocabSize * 4).toLong()
            val hidden = rows * info.hiddenSize * 4 * 16
            val attention = rows * promptTokens * info.numAttentionHeads * 4L * 2
            val element = if (manifest.io.kvDtype == "float16") 2L else 4L
            val kv = 2L * info.numLayers * info.numKvHeads * info.headDim * (promptTokens + newTokens) * element
            val copies = if (manifest.io.kvSharedBuffer) 1 else 2
            return Budget(manifest.weightBytes(), copies * kv, logits + hidden + attention)
        }

        /** Tokens per prefill call, as runtime/memory.py `prefill_chunk_for(manifest, "auto")`; null = one call. */
        fun prefillChunk(manifest: Manifest): Int? {
            if (manifest.io.logitsToKeep != null) {
                return if (ATTENTION_CHUNK < manifest.model.maxPositions) ATTENTION_CHUNK else null
            }
            val rows = (LOGITS_BUDGET / (manifest.model.vocabSize.toLong() * 4)).toInt()
            return if (rows < manifest.model.maxPositions) maxOf(16, rows) else null
        }

        const val LOGITS_BUDGET = 64L * 1024 * 1024
        const val ATTENTION_CHUNK = 512
    }
}
