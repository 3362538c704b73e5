package org.koedge.demo

import org.junit.Assert.assertTrue
import org.junit.Rule
import org.junit.Test
import org.junit.rules.TemporaryFolder
import org.koedge.engine.Manifest
import org.koedge.engine.MemoryRefusedException
import java.io.File

/** The model card and the memory refusal from a manifest and a build report (plain JVM, no bundle run). */
class ModelCardTest {
    @get:Rule
    val tmp = TemporaryFolder()

    private fun bundle(): File {
        val folder = tmp.newFolder("b")
        File(folder, "model.onnx").writeText("")
        File(folder, "koedge.json").writeText("""{"format": "koedge-bundle", "format_version": 1, "onnx_file": "model.onnx",
            "model": {"name": "gemma-3-270m", "source": "s", "revision": null, "architecture": "gemma3_text", "num_layers": 18,
              "num_attention_heads": 4, "num_kv_heads": 1, "head_dim": 256, "hidden_size": 640, "vocab_size": 262144,
              "max_positions": 32768, "parameters": 268098176},
            "tokens": {"bos_token_id": 2, "eos_token_ids": [1], "pad_token_id": 0},
            "io": {"inputs": [], "outputs": [], "logits_to_keep": "logits_to_keep"},
            "passes": [{"name": "export", "config": {}, "seconds": 1.0, "results": {}},
                       {"name": "quantize-int4", "config": {}, "seconds": 1.0, "results": {}}],
            "files": {"model.onnx.data": {"bytes": 311138674, "sha256": ""}}}""")
        File(folder, "report.json").writeText("""{"passes": [{"pass": "validate", "results": {"verdict": "PASS: peak 716 MiB is 23% of the 3,072 MiB cap"}},
            {"pass": "eval", "results": {"bundle": {"perplexity": 59.97, "reference_perplexity": 59.61, "kl_mean": 0.0072, "same_top1": 0.934}}}]}""")
        return folder
    }

    @Test
    fun cardShowsModelPassesPredictionAndMeasuredAccuracy() {
        val folder = bundle()
        val card = DemoController.card(Manifest.read(folder), File(folder, "report.json"))
        for (part in listOf("gemma-3-270m (gemma3_text, 268,098,176 parameters)", "passes: export → quantize-int4",
                "predicted memory at 512 + 256 tokens", "validated: PASS: peak 716 MiB",
                "Korean perplexity 59.97 (reference 59.61) · KL 0.0072 · same top-1 93.4%")) {
            assertTrue("$part not in\n$card", card.contains(part))
        }
    }

    @Test
    fun refusalComparesThePredictionWithAvailableMemory() {
        val manifest = Manifest.read(bundle())
        val controller = DemoController(tmp.root, { 200L shl 20 }, { it.run() }, NoListener())
        try {
            controller.checkMemory(manifest)
            throw AssertionError("not refused")
        } catch (err: MemoryRefusedException) {
            assertTrue(err.message!!, err.message!!.contains("but this phone has 200 MiB available: not loaded"))
            assertTrue(err.neededBytes > 296L shl 20)
        }
        DemoController(tmp.root, { 2L shl 30 }, { it.run() }, NoListener()).checkMemory(manifest) // fits: no exception
    }

    private class NoListener : DemoController.Listener {
        override fun onStatus(text: String) {}
        override fun onLoaded(card: String) {}
        override fun onText(piece: String) {}
        override fun onFinished(stats: String) {}
        override fun onError(message: String) {}
    }
}
