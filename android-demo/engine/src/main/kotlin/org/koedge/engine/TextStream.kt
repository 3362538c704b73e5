package org.koedge.engine

/**
 * Incremental detokenization, line for line runtime/stream.py `TextStream`: decode a small window of recent
 * tokens twice (with and without the new one), emit only the difference, and only when it does not end in
 * U+FFFD — so half a Hangul syllable (or any half UTF-8 sequence from byte-level / byte-fallback tokens)
 * is never shown. Stop strings are held back while the tail could still be the start of one.
 *
 * Lengths and slices count code points, as Python's str does (an emoji is one, not two UTF-16 units), so
 * the emitted text is identical to the Python runtime's.
 */
class TextStream(private val decode: (IntArray, Int, Int) -> String, stop: List<String> = emptyList(), context: IntArray = IntArray(0)) {
    private val stop = stop.filter { it.isNotEmpty() }
    private var tokens = context.copyOf(maxOf(16, context.size * 2))
    private var count = context.size
    private var prefix = 0
    private var read = context.size
    private var pending = ""
    private val emitted = StringBuilder()
    var stopped = false
        private set

    /** Everything emitted so far. */
    val text: String get() = emitted.toString()

    /** Add one token; return the new text that can be shown now (maybe empty). */
    fun push(token: Int): String {
        if (stopped) return ""
        if (count == tokens.size) tokens = tokens.copyOf(tokens.size * 2)
        tokens[count++] = token
        val before = decode(tokens, prefix, read)
        val after = decode(tokens, prefix, count)
        val beforeLen = cpLen(before)
        if (cpLen(after) <= beforeLen || after.endsWith(REPLACEMENT)) return ""
        prefix = read
        read = count
        return release(pending + cpDrop(after, beforeLen))
    }

    /** The end of generation: release what was held back (a trailing broken byte stays out). */
    fun finish(): String {
        if (stopped) return ""
        val before = decode(tokens, prefix, read)
        val after = decode(tokens, prefix, count).trimEnd(REPLACEMENT)
        val beforeLen = cpLen(before)
        val tail = if (cpLen(after) > beforeLen) cpDrop(after, beforeLen) else ""
        val out = pending + tail
        pending = ""
        return emit(cutAtStop(out))
    }

    private fun release(text: String): String {
        val cut = cutAtStop(text)
        if (stopped) return emit(cut)
        val hold = heldTail(text)
        val n = cpLen(text)
        pending = if (hold > 0) cpDrop(text, n - hold) else ""
        return emit(cpTake(text, n - hold))
    }

    private fun cutAtStop(text: String): String {
        if (stop.isEmpty()) return text
        val longest = stop.maxOf { cpLen(it) }
        val window = cpTakeLast(emitted.toString(), longest) + text
        val hits = stop.filter { window.contains(it) }.map { window.codePointCount(0, window.indexOf(it)) }
        if (hits.isEmpty()) return text
        stopped = true
        val first = hits.minOrNull()!!
        val offset = cpLen(window) - cpLen(text)
        return if (first >= offset) cpDrop(cpTake(window, first), offset) else ""
    }

    private fun heldTail(text: String): Int {
        val joined = emitted.toString() + text
        val joinedLen = cpLen(joined)
        var hold = 0
        for (s in stop) {
            var size = minOf(cpLen(s) - 1, joinedLen)
            while (size > 0) {
                if (joined.endsWith(cpTake(s, size))) { hold = maxOf(hold, size); break }
                size--
            }
        }
        return minOf(hold, cpLen(text))
    }

    private fun emit(text: String): String {
        emitted.append(text)
        return text
    }

    companion object {
        const val REPLACEMENT = '\uFFFD'
        internal fun cpLen(s: String) = s.codePointCount(0, s.length)
        internal fun cpDrop(s: String, n: Int) = s.substring(s.offsetByCodePoints(0, n))
        internal fun cpTake(s: String, n: Int) = s.substring(0, s.offsetByCodePoints(0, n))
        internal fun cpTakeLast(s: String, n: Int): String {
            val len = cpLen(s)
            return if (n >= len) s else cpDrop(s, len - n)
        }
    }
}
