package org.koedge.engine

import ai.onnxruntime.OnnxJavaType
import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OnnxValue
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtException
import ai.onnxruntime.OrtLoggingLevel
import ai.onnxruntime.OrtSession
import java.io.File
import java.nio.Buffer
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.Locale

/** Session settings, the same defaults as runtime/session.py `SessionConfig` (low peak, no decode cost). */
class EngineOptions(
    val threads: Int = 0, // 0: onnxruntime's default (all physical cores)
    val verifyHashes: Boolean = false, // sizes are always checked; sha256 of every file costs seconds on a phone
    val prefillChunk: Int = AUTO, // tokens per prefill call; AUTO as the Python runtime, 0 = one call
) {
    companion object { const val AUTO = -1 }
}

/** runtime/generate.py `SamplingConfig`: transformers' order and meaning. */
class SamplingConfig(
    val maxNewTokens: Int = 128,
    val temperature: Double = 0.0, // 0: greedy
    val topK: Int = 0,
    val topP: Double = 1.0,
    val repetitionPenalty: Double = 1.0,
    val seed: Long? = null,
    val stop: List<String> = emptyList(),
    val stopAtEos: Boolean = true,
    val stopTokenIds: List<Int> = emptyList(),
) {
    fun check() {
        if (maxNewTokens < 1) throw PromptException("--max-new-tokens must be at least 1")
        if (temperature < 0 || !(topP > 0 && topP <= 1) || topK < 0 || repetitionPenalty <= 0) {
            throw PromptException("sampling needs temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition penalty > 0")
        }
    }
}

class GenerationResult(
    val promptTokens: IntArray,
    val tokens: IntArray,
    val text: String,
    val stopReason: String, // eos | stop | length | context | cancelled
    val loadSeconds: Double,
    val prefillSeconds: Double,
    val ttftSeconds: Double,
    val decodeSeconds: Double,
    val kvBytes: Long,
) {
    val decodeTokensPerSecond: Double
        get() {
            val steps = tokens.size - 1
            return if (steps > 0 && decodeSeconds > 0) steps / decodeSeconds else 0.0
        }

    /** The same line `koedge run` prints on stderr. */
    fun timingLine(): String = String.format(Locale.ROOT,
        "load %.2f s · prompt %d tok · TTFT %.0f ms · %d tok at %.1f tok/s · stop: %s",
        loadSeconds, promptTokens.size, ttftSeconds * 1000, tokens.size, decodeTokensPerSecond, stopReason)
}

/**
 * One bundle, ready to generate: manifest, tokenizer and an onnxruntime session opened from the file path
 * (external weights memory-mapped, never read into the Java heap), plus the KV cache kept in direct buffers.
 *
 * Mirrors runtime/model.py + runtime/kvcache.py `BoundCache` + runtime/generate.py `Generator`, so greedy
 * tokens equal `koedge run`'s: prefill in the same chunks with the same attention_mask / position_ids and
 * last-position logits (`logits_to_keep`), then one token per step.
 *
 * Not thread-safe: one generation at a time ([cancel] may be called from any thread).
 */
class Engine(folder: File, val options: EngineOptions = EngineOptions()) : AutoCloseable {
    val folder: File = folder.absoluteFile
    val manifest: Manifest
    val tokenizer: Tokenizer
    val loadSeconds: Double
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val session: OrtSession
    private val io: IOContract
    private val layers: Int
    private val pastNames: List<String>
    private val presentNames: List<String>
    private val kvType: OnnxJavaType
    private val kvElement: Int
    private val logitsHalf: Boolean
    private val vocab: Int
    private val positionSize: Int // kv_heads * head_dim elements per position
    private val prefillChunk: Int?
    /** The graph input that asks for the last position's logits only, when the graph really takes it as a feed. */
    private var lastOnlyInput: String? = null
    @Volatile private var cancelled = false

    /** Decode steps timed so far, and their nanoseconds inside onnxruntime vs in the whole step (tensors, copies). */
    var stepCount = 0L
        private set
    var stepOrtNanos = 0L
        private set
    var stepTotalNanos = 0L
        private set

    // the KV cache: ping-pong (two slabs per name) or one shared buffer per name
    private var slabs: Array<Array<ByteBuffer>> = arrayOf(emptyArray(), emptyArray())
    private var side = 0
    private var shared: Array<ByteBuffer> = emptyArray()
    private var sharedTensors: Array<OnnxTensor> = emptyArray()
    // sliding-window layers' views of their shared buffers (slot in pastNames -> tensor), and where they start
    private val windowSlots: Set<Int>
    private var windowViews: Map<Int, OnnxTensor> = emptyMap()
    private var windowOffset = 0
    /** Where the sliding-window layers' KV views start now (0: whole buffers). */
    val windowStart: Int get() = windowOffset
    private var capacity = 0
    var length = 0
        private set

    // decode-step buffers, allocated once
    private val stepLogits: ByteBuffer
    private val stepLogitsTensor: OnnxTensor
    private val scores: FloatArray

    init {
        val started = System.nanoTime()
        manifest = Manifest.read(folder)
        checkFiles()
        tokenizer = Tokenizer.fromFile(File(folder, "tokenizer.json"))
        // Parsing tokenizer.json (gemma: 14 MB, 262,144 pieces) leaves ~200 MiB of garbage for ~50 MiB kept:
        // collect it now, before the weights come in, so a heap that may shrink (ART; a JVM with
        // -XX:MaxHeapFreeRatio) gives it back instead of carrying it into the peak.
        System.gc()
        io = manifest.io
        layers = manifest.model.numLayers
        pastNames = io.pastNames(layers)
        presentNames = io.presentNames(layers)
        kvType = when (io.kvDtype) {
            "float32" -> OnnxJavaType.FLOAT
            "float16" -> OnnxJavaType.FLOAT16
            else -> throw ContractMismatchException("KV dtype '${io.kvDtype}' is not supported (float32, float16)")
        }
        kvElement = if (kvType == OnnxJavaType.FLOAT) 4 else 2
        val logitsSpec = io.outputs.firstOrNull { it.name == io.logits }
            ?: throw ContractMismatchException("the manifest lists no logits output named '${io.logits}'")
        logitsHalf = when (logitsSpec.dtype) {
            "float32" -> false
            "float16" -> true
            else -> throw ContractMismatchException("logits dtype '${logitsSpec.dtype}' is not supported")
        }
        vocab = (logitsSpec.shape.lastOrNull() as? Number)?.toInt() ?: manifest.model.vocabSize
        positionSize = manifest.model.numKvHeads * manifest.model.headDim
        windowSlots = if (io.kvSharedBuffer && io.kvWindowOffset != null && io.kvWindow > 0 && manifest.model.numKvHeads == 1)
            io.kvWindowLayers.flatMap { listOf(2 * it, 2 * it + 1) }.toSet() else emptySet()
        prefillChunk = when {
            options.prefillChunk == EngineOptions.AUTO -> Budget.prefillChunk(manifest)
            options.prefillChunk > 0 -> options.prefillChunk
            else -> null
        }
        session = openSession()
        checkContract()
        stepLogits = direct(vocab.toLong() * (if (logitsHalf) 2 else 4))
        stepLogitsTensor = tensor(stepLogits, longArrayOf(1, 1, vocab.toLong()), if (logitsHalf) OnnxJavaType.FLOAT16 else OnnxJavaType.FLOAT)
        scores = FloatArray(vocab)
        loadSeconds = (System.nanoTime() - started) / 1e9
    }

    /**
     * A truncated or missing file is named before onnxruntime sees it (it would fail obscurely, or crash).
     * Only the files a run reads: the graph, its weights and the tokenizer (report.json and the like are
     * rewritten by later build passes after the manifest recorded them, so their sizes may differ).
     */
    private fun checkFiles() {
        for ((name, record) in manifest.files) {
            if (!isRunFile(name)) continue
            val file = File(folder, name)
            if (!file.isFile) throw CorruptBundleException("bundle $folder lacks $name (the manifest lists it)")
            if (file.length() != record.bytes) {
                throw CorruptBundleException("$name is ${file.length()} bytes but the manifest says ${record.bytes}: " +
                    "the copy is incomplete or damaged (copy the bundle again)")
            }
            if (options.verifyHashes && record.sha256.isNotEmpty() && sha256(file) != record.sha256) {
                throw CorruptBundleException("$name does not match its sha256 in the manifest (copy the bundle again)")
            }
        }
    }

    private fun isRunFile(name: String): Boolean = name == manifest.onnxFile || name.startsWith("tokenizer") ||
        name == "token_map.json" || name.endsWith(".onnx") || name.endsWith(".onnx.data") || name.endsWith(".onnx_data") ||
        name.endsWith(".data")

    private fun openSession(): OrtSession {
        val opts = OrtSession.SessionOptions()
        try {
            opts.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
            if (options.threads > 0) opts.setIntraOpNumThreads(options.threads)
            opts.setInterOpNumThreads(1)
            opts.setSessionLogLevel(OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR)
            opts.setCPUArenaAllocator(false)
            opts.setMemoryPatternOptimization(false)
            if (!manifest.prepacking) opts.addConfigEntry("session.disable_prepacking", "1")
            // from the path: external data is memory-mapped (bytes would put the whole model on the heap)
            return env.createSession(File(folder, manifest.onnxFile).path, opts)
        } catch (err: OrtException) {
            val line = (err.message ?: err.javaClass.simpleName).trim().lines().first().take(300)
            throw CorruptBundleException("onnxruntime cannot load ${File(folder, manifest.onnxFile)}: $line", err)
        } finally {
            opts.close()
        }
    }

    private fun checkContract() {
        val graphInputs = session.inputNames
        val declared = io.inputs.map { it.name }.toSet()
        val graphOnly = graphInputs - declared
        // Bundles exported before logits_to_keep became a plain input hold it as an initializer that is also an
        // input ("overridable"): the Java API neither lists nor feeds those, so such a graph computes every position.
        val manifestOnly = declared - graphInputs - setOfNotNull(io.logitsToKeep)
        if (graphOnly.isNotEmpty() || manifestOnly.isNotEmpty()) {
            throw ContractMismatchException("manifest does not match the ONNX inputs (manifest only: " +
                "${manifestOnly.sorted().take(3)}, graph only: ${graphOnly.sorted().take(3)})")
        }
        val outputs = session.outputNames
        val missing = (listOf(io.logits) + presentNames).filter { it !in outputs }
        if (missing.isNotEmpty()) throw ContractMismatchException("the graph has no output ${missing.take(3)} the manifest names")
        val inputs = listOf("input_ids", "attention_mask") + pastNames + (if (io.usesPositionIds) listOf("position_ids") else emptyList())
        val absent = inputs.filter { it !in declared }
        if (absent.isNotEmpty()) throw ContractMismatchException("the manifest lacks the inputs ${absent.take(3)}")
        lastOnlyInput = io.logitsToKeep?.takeIf { it in graphInputs }
    }

    // --- the KV cache ---------------------------------------------------------------------------------------------
    /** Make the buffers hold [tokens] positions, keeping the cached ones (one copy when they grow). */
    fun reserve(tokens: Int) {
        if (tokens <= capacity) return
        val size = minOf(tokens, manifest.model.maxPositions)
        val bytes = size.toLong() * positionSize * kvElement
        if (io.kvSharedBuffer) {
            val buffers = Array(pastNames.size) { direct(bytes) }
            if (length > 0) {
                // [1, heads, capacity, dim]: copy each head's valid prefix
                val heads = manifest.model.numKvHeads
                val rowOld = capacity.toLong() * manifest.model.headDim * kvElement
                val rowNew = size.toLong() * manifest.model.headDim * kvElement
                val used = length.toLong() * manifest.model.headDim * kvElement
                for ((new, old) in buffers.zip(shared)) {
                    for (h in 0 until heads) copy(old, h * rowOld, new, h * rowNew, used)
                }
            }
            sharedTensors.forEach { it.close() }
            closeWindowViews()
            shared = buffers
            val shape = longArrayOf(1, manifest.model.numKvHeads.toLong(), size.toLong(), manifest.model.headDim.toLong())
            sharedTensors = Array(buffers.size) { tensor(buffers[it], shape, kvType) }
        } else {
            val used = length.toLong() * positionSize * kvElement // the past lies contiguous at the start of its slab
            val fresh = arrayOf(Array(pastNames.size) { direct(bytes) }, Array(pastNames.size) { direct(bytes) })
            if (used > 0) for ((new, old) in fresh[side].zip(slabs[side])) copy(old, 0, new, 0, used)
            slabs = fresh
        }
        capacity = size
    }

    /** Forget the sequence (buffers stay allocated). */
    fun reset() {
        length = 0
        side = 0
    }

    /** Bytes the cache holds now (as `BoundCache.kv_bytes`). */
    fun kvBytes(): Long = if (io.kvSharedBuffer) shared.sumOf { it.capacity().toLong() }
        else pastNames.size.toLong() * length * positionSize * kvElement

    /** Feed [ids] after the cached tokens; the last position's logits land in [scores]. */
    fun run(ids: IntArray, chunk: Int? = null): FloatArray {
        if (ids.isEmpty()) throw PromptException("expected at least one input id")
        if (length + ids.size > manifest.model.maxPositions) {
            throw PromptException("${length + ids.size} tokens exceed the model's context of ${manifest.model.maxPositions}")
        }
        if (length + ids.size > capacity) reserve(maxOf(length + ids.size, 2 * capacity, 256))
        val step = chunk ?: ids.size
        var start = 0
        while (start < ids.size) {
            val end = minOf(ids.size, start + step)
            call(ids, start, end)
            start = end
        }
        return scores
    }

    private fun call(ids: IntArray, from: Int, to: Int) {
        val callStart = System.nanoTime()
        var ortNanos = 0L
        val seq = to - from
        val rows = if (lastOnlyInput != null) 1 else seq
        val owned = ArrayList<OnnxTensor>()
        try {
            val feeds = LinkedHashMap<String, OnnxTensor>()
            feeds["input_ids"] = longs(owned, LongArray(seq) { ids[from + it].toLong() }, longArrayOf(1, seq.toLong()))
            feeds["attention_mask"] = longs(owned, LongArray(length + seq) { 1L }, longArrayOf(1, (length + seq).toLong()))
            if (io.usesPositionIds) {
                feeds["position_ids"] = longs(owned, LongArray(seq) { (length + it).toLong() }, longArrayOf(1, seq.toLong()))
            }
            lastOnlyInput?.let { feeds[it] = longs(owned, longArrayOf(1L), longArrayOf(1)) }
            val offset = windowOffsetFor(seq)
            io.kvWindowOffset?.let { feeds[it] = longs(owned, longArrayOf(offset.toLong()), longArrayOf(1)) }
            val pinned = LinkedHashMap<String, OnnxValue>()
            val logitsBuffer: ByteBuffer
            if (rows == 1) {
                logitsBuffer = stepLogits
                pinned[io.logits] = stepLogitsTensor
            } else {
                logitsBuffer = direct(rows.toLong() * vocab * (if (logitsHalf) 2 else 4))
                pinned[io.logits] = tensor(logitsBuffer, longArrayOf(1, rows.toLong(), vocab.toLong()),
                    if (logitsHalf) OnnxJavaType.FLOAT16 else OnnxJavaType.FLOAT).also { owned.add(it) }
            }
            val heads = manifest.model.numKvHeads.toLong()
            val dim = manifest.model.headDim.toLong()
            if (io.kvSharedBuffer) { // the same buffer in and out: the kernel appends in place
                if (offset != windowOffset) moveWindowViews(offset)
                for (i in pastNames.indices) {
                    val kv = windowViews[i] ?: sharedTensors[i]
                    feeds[pastNames[i]] = kv
                    pinned[presentNames[i]] = kv
                }
            } else { // past from one slab, present into the other
                val pastBytes = length.toLong() * positionSize * kvElement
                val presentBytes = (length + seq).toLong() * positionSize * kvElement
                for (i in pastNames.indices) {
                    feeds[pastNames[i]] = tensor(view(slabs[side][i], pastBytes), longArrayOf(1, heads, length.toLong(), dim), kvType)
                        .also { owned.add(it) }
                    pinned[presentNames[i]] = tensor(view(slabs[1 - side][i], presentBytes), longArrayOf(1, heads, (length + seq).toLong(), dim), kvType)
                        .also { owned.add(it) }
                }
            }
            val ortStart = System.nanoTime()
            session.run(feeds, emptySet(), pinned).close() // every output is pinned: the Result holds nothing of ours
            ortNanos = System.nanoTime() - ortStart
            readLastRow(logitsBuffer, rows)
        } catch (err: OrtException) {
            throw KoedgeException("onnxruntime failed: ${(err.message ?: "").lines().first().take(300)}", err)
        } finally {
            owned.forEach { it.close() }
        }
        if (!io.kvSharedBuffer) side = 1 - side
        length += seq
        if (seq == 1) {
            stepCount++
            stepOrtNanos += ortNanos
            stepTotalNanos += System.nanoTime() - callStart
        }
    }

    /**
     * Where the sliding-window layers' KV views start for a call of [seq] tokens, as runtime/kvcache.py: 0 for a
     * prefill, else a multiple of window/8 at most `length - window`. onnxruntime's CPU attention multiplies the
     * query with every position it is given before masking the ones outside the window; a view gives it the window.
     */
    private fun windowOffsetFor(seq: Int): Int {
        if (windowSlots.isEmpty() || seq != 1) return 0
        val step = maxOf(1, io.kvWindow / 8)
        return maxOf(0, (length - io.kvWindow) / step * step)
    }

    /** Bind the sliding-window layers' buffers from [offset] on (one KV head: the buffer's tail is one tensor). */
    private fun moveWindowViews(offset: Int) {
        closeWindowViews()
        val dim = manifest.model.headDim.toLong()
        val shape = longArrayOf(1, 1, (capacity - offset).toLong(), dim)
        windowViews = if (offset == 0) emptyMap() else windowSlots.associateWith {
            tensor(tail(shared[it], offset * dim * kvElement), shape, kvType)
        }
        windowOffset = offset
    }

    private fun closeWindowViews() {
        windowViews.values.forEach { it.close() }
        windowViews = emptyMap()
        windowOffset = 0
    }

    private fun readLastRow(buffer: ByteBuffer, rows: Int) {
        if (logitsHalf) {
            val shorts = buffer.duplicate().order(ByteOrder.nativeOrder()).asShortBuffer()
            val base = (rows - 1) * vocab
            for (i in 0 until vocab) scores[i] = halfToFloat(shorts.get(base + i))
        } else {
            val floats = buffer.duplicate().order(ByteOrder.nativeOrder()).asFloatBuffer()
            (floats as Buffer).position((rows - 1) * vocab)
            floats.get(scores, 0, vocab)
        }
    }

    // --- generation ---------------------------------------------------------------------------------------------
    /** Ids of [text] with the bundle's BOS in front (runtime/model.py `encode`). */
    fun encode(text: String, addBos: Boolean = true): IntArray {
        val ids = tokenizer.encode(text)
        val bos = manifest.tokens.bosTokenId
        return if (addBos && bos != null) intArrayOf(bos) + ids else ids
    }

    fun decode(ids: IntArray): String = tokenizer.decode(ids)

    val context: Int get() = manifest.model.maxPositions

    fun checkPrompt(prompt: IntArray) {
        if (prompt.isEmpty()) throw PromptException("the prompt is empty")
        if (prompt.size >= context) throw PromptException("the prompt has ${prompt.size} tokens; the model's context is $context")
    }

    /** Ask a running [generate] to stop after the current step (from any thread). */
    fun cancel() { cancelled = true }

    /** Prefill [prompt] (ids, BOS included) and generate; [onText] gets each piece of text as it becomes safe to show. */
    fun generate(prompt: IntArray, config: SamplingConfig = SamplingConfig(), onText: ((String) -> Unit)? = null): GenerationResult {
        config.check()
        checkPrompt(prompt)
        cancelled = false
        val sampler = Sampler(config)
        val eos = if (config.stopAtEos) (manifest.tokens.eosTokenIds + config.stopTokenIds).toSet() else emptySet()
        val stream = TextStream({ ids, from, to -> tokenizer.decode(ids, from, to) }, config.stop,
            prompt.copyOfRange(maxOf(0, prompt.size - 4), prompt.size))
        reserve(prompt.size + config.maxNewTokens)
        val started = System.nanoTime()
        reset()
        var logits = run(prompt, prefillChunk)
        val prefillSeconds = (System.nanoTime() - started) / 1e9
        val seen = IntArray(prompt.size + config.maxNewTokens)
        System.arraycopy(prompt, 0, seen, 0, prompt.size)
        var count = 0
        var reason = "length"
        var firstAt = 0L
        while (true) {
            val token = sampler.next(logits, seen, prompt.size + count)
            seen[prompt.size + count] = token
            count++
            if (firstAt == 0L) firstAt = System.nanoTime()
            if (token in eos) { reason = "eos"; break }
            val piece = stream.push(token)
            if (piece.isNotEmpty()) onText?.invoke(piece)
            if (stream.stopped) { reason = "stop"; break }
            if (count >= config.maxNewTokens) break
            if (length + 1 > context) { reason = "context"; break }
            if (cancelled) { reason = "cancelled"; break }
            logits = run(intArrayOf(token))
        }
        val ended = System.nanoTime()
        val tail = stream.finish()
        if (tail.isNotEmpty()) onText?.invoke(tail)
        return GenerationResult(prompt.copyOf(), seen.copyOfRange(prompt.size, prompt.size + count), stream.text, reason,
            loadSeconds, prefillSeconds, (firstAt - started) / 1e9, (ended - firstAt) / 1e9, kvBytes())
    }

    override fun close() {
        closeWindowViews()
        sharedTensors.forEach { it.close() }
        stepLogitsTensor.close()
        session.close()
    }

    // --- buffers ----------------------------------------------------------------------------------------------------
    private fun longs(owned: MutableList<OnnxTensor>, values: LongArray, shape: LongArray): OnnxTensor {
        val buffer = direct(values.size * 8L)
        buffer.asLongBuffer().put(values)
        return tensor(buffer, shape, OnnxJavaType.INT64).also { owned.add(it) }
    }

    private fun tensor(buffer: ByteBuffer, shape: LongArray, type: OnnxJavaType): OnnxTensor =
        OnnxTensor.createTensor(env, buffer, shape, type)

    companion object {
        /** A native-order direct buffer: onnxruntime wraps it without a copy. */
        internal fun direct(bytes: Long): ByteBuffer {
            if (bytes > Int.MAX_VALUE) throw KoedgeException("a buffer of $bytes bytes is too large")
            return ByteBuffer.allocateDirect(bytes.toInt()).order(ByteOrder.nativeOrder())
        }

        /** [buffer] from byte [from] on as its own direct buffer (same memory). */
        internal fun tail(buffer: ByteBuffer, from: Long): ByteBuffer {
            val d = buffer.duplicate()
            (d as Buffer).position(from.toInt())
            return d.slice().order(ByteOrder.nativeOrder())
        }

        /** The first [bytes] of [buffer] as its own direct buffer (same memory). */
        internal fun view(buffer: ByteBuffer, bytes: Long): ByteBuffer {
            val d = buffer.duplicate()
            (d as Buffer).position(0)
            (d as Buffer).limit(bytes.toInt())
            return d.slice().order(ByteOrder.nativeOrder())
        }

        private fun copy(from: ByteBuffer, fromAt: Long, to: ByteBuffer, toAt: Long, bytes: Long) {
            val src = from.duplicate()
            (src as Buffer).position(fromAt.toInt())
            (src as Buffer).limit((fromAt + bytes).toInt())
            val dst = to.duplicate()
            (dst as Buffer).position(toAt.toInt())
            dst.put(src)
        }

        internal fun halfToFloat(h: Short): Float {
            val bits = h.toInt() and 0xFFFF
            val sign = bits and 0x8000 shl 16
            val exp = bits ushr 10 and 0x1F
            val mant = bits and 0x3FF
            val out = when {
                exp == 0 -> if (mant == 0) sign else {
                    var e = 127 - 15 + 1
                    var m = mant
                    while (m and 0x400 == 0) { m = m shl 1; e-- }
                    sign or (e shl 23) or ((m and 0x3FF) shl 13)
                }
                exp == 0x1F -> sign or 0x7F800000 or (mant shl 13)
                else -> sign or ((exp - 15 + 127) shl 23) or (mant shl 13)
            }
            return java.lang.Float.intBitsToFloat(out)
        }

        internal fun sha256(file: File): String {
            val digest = java.security.MessageDigest.getInstance("SHA-256")
            file.inputStream().use { input ->
                val block = ByteArray(1 shl 20)
                while (true) {
                    val n = input.read(block)
                    if (n < 0) break
                    digest.update(block, 0, n)
                }
            }
            return digest.digest().joinToString("") { String.format("%02x", it) }
        }
    }
}
