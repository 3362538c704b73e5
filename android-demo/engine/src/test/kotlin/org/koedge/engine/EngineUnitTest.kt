package org.koedge.engine

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

/** The engine's pure parts, without a bundle (bundles: tests/test_android_engine.py drives the jar). */
class EngineUnitTest {
    @Test
    fun jsonReadsWhatPythonWrites() {
        val value = Json.parse("""{"a": [1, -2.5e3, true, null, "\u1100\uac00\n\"x\""], "b": {}, "c": []}""").obj("root")
        val a = value["a"].arr("a")
        assertEquals(1L, a[0])
        assertEquals(-2500.0, a[1])
        assertEquals(true, a[2])
        assertEquals(null, a[3])
        assertEquals("\u1100가\n\"x\"", a[4])
        assertEquals("😀", Json.parse("\"\\ud83d\\ude00\""))
        for (bad in listOf("{", "[1,]", "{\"a\" 1}", "tru", "\"abc", "1 2")) {
            try { Json.parse(bad); fail("parsed $bad") } catch (err: IllegalArgumentException) { }
        }
    }

    @Test
    fun utf8LossyFollowsRust() {
        val han = "한".toByteArray(Charsets.UTF_8) // ED 95 9C
        assertEquals("한", Utf8.lossy(han))
        assertEquals("\uFFFD", Utf8.lossy(han.copyOf(2))) // a truncated sequence is one replacement
        assertEquals("\uFFFD\uFFFD", Utf8.lossy(byteArrayOf(0x80.toByte(), 0xBF.toByte())))
        assertEquals("\uFFFDa", Utf8.lossy(byteArrayOf(0xED.toByte(), 'a'.code.toByte())))
        assertEquals("\uFFFD\uFFFD", Utf8.lossy(byteArrayOf(0xED.toByte(), 0xA0.toByte()))) // surrogate: ED then A0
        assertEquals(null, Utf8.strict(han.copyOf(2)))
        assertEquals("😀", Utf8.lossy("😀".toByteArray(Charsets.UTF_8)))
    }

    /** Tokens 0-2 are the three bytes of 한, 3 is "a", 4 is "b": a byte-fallback-like decoder. */
    private fun decoder(): (IntArray, Int, Int) -> String = { ids, from, to ->
        val bytes = java.io.ByteArrayOutputStream()
        val han = "한".toByteArray(Charsets.UTF_8)
        for (i in from until to) when (ids[i]) {
            0, 1, 2 -> bytes.write(han[ids[i]].toInt())
            3 -> bytes.write('a'.code)
            4 -> bytes.write('b'.code)
        }
        Utf8.lossy(bytes.toByteArray())
    }

    @Test
    fun streamNeverShowsHalfASyllable() {
        val stream = TextStream(decoder())
        assertEquals("a", stream.push(3))
        assertEquals("", stream.push(0))
        assertEquals("", stream.push(1))
        assertEquals("한", stream.push(2))
        assertEquals("", stream.push(0)) // a broken tail at the end stays out
        assertEquals("", stream.finish())
        assertEquals("a한", stream.text)
    }

    @Test
    fun streamCutsAtStopStringsAcrossPieces() {
        val stream = TextStream(decoder(), listOf("ab"))
        assertEquals("", stream.push(3)) // "a" could start "ab": held back
        assertEquals("", stream.push(4))
        assertTrue(stream.stopped)
        assertEquals("", stream.text)
        val other = TextStream(decoder(), listOf("ab"))
        assertEquals("", other.push(3))
        assertEquals("a", other.push(3)) // the first "a" cannot start "ab" any more
        assertEquals("a", other.finish())
        assertEquals("aa", other.text)
    }

    @Test
    fun greedyIsTheFirstArgmaxAfterThePenalty() {
        val sampler = Sampler(SamplingConfig(repetitionPenalty = 2.0))
        val logits = floatArrayOf(1f, 3f, 3f, -1f)
        assertEquals(2, sampler.next(logits.copyOf(), intArrayOf(1), 1)) // 3/2 < 3
        assertEquals(1, Sampler(SamplingConfig()).next(logits.copyOf(), intArrayOf(), 0)) // ties: the first
        val penalized = logits.copyOf()
        Sampler(SamplingConfig(repetitionPenalty = 2.0)).next(penalized, intArrayOf(3, 3, 3), 3)
        assertEquals(-2f, penalized[3]) // negative scores are multiplied, once per distinct id
    }

    @Test
    fun seededSamplingIsReproducibleAndFiltered() {
        val logits = FloatArray(50) { (it % 7).toFloat() }
        fun draw(seed: Long, topK: Int = 0, topP: Double = 1.0) =
            (0 until 40).map { Sampler(SamplingConfig(temperature = 1.0, topK = topK, topP = topP, seed = seed + it)).next(logits.copyOf(), IntArray(0), 0) }
        assertEquals(draw(7), draw(7))
        assertNotEquals(draw(7), draw(8))
        assertTrue(draw(1, topK = 7).all { it % 7 == 6 }) // the 7 tokens scoring 6
        assertTrue(draw(1, topP = 0.3).all { it % 7 == 6 })
    }

    @Test
    fun halfFloats() {
        assertEquals(1.0f, Engine.halfToFloat(0x3C00.toShort()))
        assertEquals(-2.0f, Engine.halfToFloat(0xC000.toShort()))
        assertEquals(5.9604645E-8f, Engine.halfToFloat(0x0001.toShort()))
        assertEquals(65504f, Engine.halfToFloat(0x7BFF.toShort()))
        assertTrue(Engine.halfToFloat(0x7C00.toShort()).isInfinite())
    }

    @Test
    fun tokenizerBasicsAndRefusals() {
        val json = """{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "<0xEA>": 3}, "merges": ["a b"],
            "byte_fallback": true}, "added_tokens": [{"id": 4, "content": "<s>", "special": true, "normalized": false}]}"""
        val tokenizer = Tokenizer.fromJson(Json.parse(json).obj("t"))
        assertArrayEquals(intArrayOf(2, 4, 0), tokenizer.encode("ab<s>a"))
        assertEquals("aba", tokenizer.decode(intArrayOf(2, 4, 0)).replace(" ", ""))
        for (bad in listOf("""{"model": {"type": "WordPiece"}}""",
                """{"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": {"type": "BertNormalizer"}}""")) {
            try { Tokenizer.fromJson(Json.parse(bad).obj("t")); fail(bad) } catch (err: UnsupportedTokenizerException) { }
        }
    }
}
