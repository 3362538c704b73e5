package org.koedge.demo

import org.koedge.engine.Budget
import org.koedge.engine.Engine
import org.koedge.engine.EngineOptions
import org.koedge.engine.GenerationResult
import org.koedge.engine.Json
import org.koedge.engine.KoedgeException
import org.koedge.engine.Manifest
import org.koedge.engine.Memory
import org.koedge.engine.MemoryRefusedException
import org.koedge.engine.SamplingConfig
import java.io.File
import java.util.Locale
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * What the screen does, without the screen: list bundles, describe one, refuse one that will not fit,
 * load it and generate on one background thread. Every callback is handed to [post] (the Activity posts
 * to the main thread), so views are only touched there.
 */
class DemoController(
    private val bundlesDir: File,
    private val availableMemory: () -> Long,
    private val post: (Runnable) -> Unit,
    private val listener: Listener,
) {
    interface Listener {
        fun onStatus(text: String)
        fun onLoaded(card: String)
        fun onText(piece: String)
        fun onFinished(stats: String)
        fun onError(message: String)
    }

    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    @Volatile private var engine: Engine? = null
    @Volatile var busy = false
        private set

    /** Bundle folders (those with koedge.json) in the app's files folder, by name. */
    fun bundles(): List<File> =
        (bundlesDir.listFiles() ?: emptyArray()).filter { File(it, Manifest.FILE).isFile }.sortedBy { it.name }

    /** Folders in the files folder that are not bundles (shown so a half-pushed folder is not a mystery). */
    fun strays(): List<File> =
        (bundlesDir.listFiles() ?: emptyArray()).filter { it.isDirectory && !File(it, Manifest.FILE).isFile }

    /** Read the manifest, check memory, then open the session in the background. */
    fun load(folder: File) {
        if (busy) return
        busy = true
        listener.onStatus("Loading ${folder.name}…")
        worker.execute(Task {
            try {
                engine?.close()
                engine = null
                val manifest = Manifest.read(folder)
                checkMemory(manifest)
                val loaded = Engine(folder, EngineOptions())
                engine = loaded
                val card = card(loaded.manifest, File(folder, "report.json")) + String.format(Locale.ROOT, "\nloaded in %.2f s · RSS %s",
                    loaded.loadSeconds, mib(Memory.currentRss()))
                post(Runnable { busy = false; listener.onLoaded(card) })
            } catch (err: KoedgeException) {
                post(Runnable { busy = false; listener.onError(err.message ?: err.javaClass.simpleName) })
            } catch (err: OutOfMemoryError) {
                engine = null
                post(Runnable { busy = false; listener.onError("out of memory while loading ${folder.name}") })
            } catch (err: RuntimeException) { // a bug, but the screen says so instead of crashing
                engine = null
                post(Runnable { busy = false; listener.onError("cannot load ${folder.name}: $err") })
            }
        })
    }

    /** The refusal: predicted memory for a 512-token prompt + 256 tokens against what the phone has available. */
    fun checkMemory(manifest: Manifest) {
        val need = Budget.predict(manifest, PROMPT_TOKENS, NEW_TOKENS).total
        val available = availableMemory()
        if (need > available) {
            throw MemoryRefusedException("${manifest.model.name} needs about ${mib(need)} (weights, KV cache and " +
                "activations for $PROMPT_TOKENS + $NEW_TOKENS tokens) but this phone has ${mib(available)} available: " +
                "not loaded. Use a smaller bundle (koedge build --recipe phone-small).", need, available)
        }
    }

    fun generate(prompt: String, maxNewTokens: Int = 128) {
        val current = engine
        if (current == null) { listener.onError("load a bundle first"); return }
        if (busy) return
        busy = true
        worker.execute(Task {
            try {
                // A bundle with a chat turn format (instruction-tuned) gets the prompt as one user turn, as
                // `koedge run --chat` does; plain continuation otherwise.
                val chat = current.manifest.tokens.chatFormat
                val ids = if (chat != null) current.encode(chat.prompt(listOf(prompt)), addBos = false)
                    else current.encode(prompt)
                current.checkPrompt(ids)
                val config = SamplingConfig(maxNewTokens = maxNewTokens, repetitionPenalty = 1.2,
                    stopTokenIds = chat?.endOfTurnIds ?: emptyList())
                val result = current.generate(ids, config) { piece ->
                    post(Runnable { listener.onText(piece) })
                }
                val stats = stats(result)
                post(Runnable { busy = false; listener.onFinished(stats) })
            } catch (err: KoedgeException) {
                post(Runnable { busy = false; listener.onError(err.message ?: err.javaClass.simpleName) })
            } catch (err: RuntimeException) {
                post(Runnable { busy = false; listener.onError("generation failed: $err") })
            }
        })
    }

    /** Stop a running generation after the current step. */
    fun stop() { engine?.cancel() }

    fun close() {
        engine?.cancel()
        worker.execute(Task { engine?.close(); engine = null })
        worker.shutdown()
    }

    private fun stats(result: GenerationResult): String = String.format(Locale.ROOT,
        "TTFT %.0f ms · %.1f tok/s · %d tok · stop: %s · RSS %s (peak %s)",
        result.ttftSeconds * 1000, result.decodeTokensPerSecond, result.tokens.size, result.stopReason,
        mib(Memory.currentRss()), mib(Memory.peakRss()))

    /** A Runnable as a class (no lambda): ART without D8 desugaring. */
    private class Task(private val body: () -> Unit) : Runnable { override fun run() = body() }

    companion object {
        const val PROMPT_TOKENS = 512
        const val NEW_TOKENS = 256

        fun mib(bytes: Long?): String = if (bytes == null) "-" else String.format(Locale.ROOT, "%,d MiB", bytes / 1048576)

        /** The model card: model, size, passes and predicted memory from the manifest; measured accuracy and
         *  memory from the build's report.json when the bundle has one (`koedge build` writes it). */
        fun card(manifest: Manifest, report: File? = null): String {
            val info = manifest.model
            val lines = ArrayList<String>()
            lines.add("${info.name} (${info.architecture}, ${String.format(Locale.ROOT, "%,d", info.parameters)} parameters)")
            lines.add("bundle ${mib(manifest.files.values.sumOf { it.bytes })} · context ${info.maxPositions} · " +
                "vocabulary ${info.vocabSize}")
            lines.add("passes: " + manifest.passes.joinToString(" → ") { it.name }.ifEmpty { "export" })
            lines.add(if (manifest.tokens.chatFormat != null) "chat: the prompt is one user turn (the model's chat format)"
                else "completion: the model continues the prompt")
            val budget = Budget.predict(manifest, PROMPT_TOKENS, NEW_TOKENS)
            lines.add("predicted memory at $PROMPT_TOKENS + $NEW_TOKENS tokens: ${mib(budget.total)}")
            if (report != null && report.isFile) lines.addAll(measured(report))
            return lines.joinToString("\n")
        }

        /** validate's verdict and eval's perplexity / KL / same-top-1 vs the reference, from report.json. */
        fun measured(report: File): List<String> = try {
            val passes = (Json.parse(report.readText(Charsets.UTF_8)) as Map<*, *>)["passes"] as? List<*> ?: emptyList<Any?>()
            val out = ArrayList<String>()
            for (item in passes) {
                val pass = item as? Map<*, *> ?: continue
                val results = pass["results"] as? Map<*, *> ?: continue
                when (pass["pass"]) {
                    "validate" -> (results["verdict"] as? String)?.let { out.add("validated: $it") }
                    "eval" -> {
                        val bundle = results["bundle"] as? Map<*, *> ?: continue
                        val ppl = (bundle["perplexity"] as? Number)?.toDouble()
                        val ref = (bundle["reference_perplexity"] as? Number)?.toDouble()
                        val kl = (bundle["kl_mean"] as? Number)?.toDouble()
                        val top1 = (bundle["same_top1"] as? Number)?.toDouble()
                        if (ppl != null) out.add(String.format(Locale.ROOT, "Korean perplexity %.2f%s%s%s", ppl,
                            if (ref != null) String.format(Locale.ROOT, " (reference %.2f)", ref) else "",
                            if (kl != null) String.format(Locale.ROOT, " · KL %.4f", kl) else "",
                            if (top1 != null) String.format(Locale.ROOT, " · same top-1 %.1f%%", 100 * top1) else ""))
                    }
                }
            }
            out
        } catch (err: RuntimeException) {
            emptyList()
        }
    }
}
