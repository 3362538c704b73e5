package org.koedge.engine

import java.util.SplittableRandom

/**
 * Next-token choice from one row of logits, as runtime/generate.py `Sampler`: repetition penalty
 * (CTRL-style, once per distinct seen id, in float32 like numpy), then temperature, top-k, top-p.
 *
 * Greedy (temperature 0) is the argmax of the penalized float32 scores, first index on ties (np.argmax):
 * identical to the Python runtime. Seeded sampling is reproducible run to run with the same seed, but uses
 * java.util.SplittableRandom, not numpy's PCG64 stream, so its draws differ from `koedge run --seed`.
 */
class Sampler(private val config: SamplingConfig) {
    private val random = if (config.seed != null) SplittableRandom(config.seed) else SplittableRandom()
    private var mark = BooleanArray(0)

    /** [logits] is modified in place (penalty, temperature); [seen] holds [seenCount] prompt + generated ids. */
    fun next(logits: FloatArray, seen: IntArray, seenCount: Int): Int {
        penalize(logits, seen, seenCount)
        if (config.temperature == 0.0) return argmax(logits)
        val temperature = config.temperature.toFloat()
        for (i in logits.indices) logits[i] = logits[i] / temperature
        if (config.topK > 0 && config.topK < logits.size) {
            val kth = logits.copyOf().also { it.sort() }[logits.size - config.topK]
            for (i in logits.indices) if (logits[i] < kth) logits[i] = Float.NEGATIVE_INFINITY
        }
        if (config.topP < 1.0) {
            val order = (0 until logits.size).sortedWith(compareBy<Int> { logits[it] }) // stable, ascending
            val probs = softmax(FloatArray(order.size) { logits[order[it]] })
            var cumulative = 0.0
            for (j in 0 until order.size - 1) { // the most likely token is always kept
                cumulative += probs[j]
                if (cumulative <= 1 - config.topP) logits[order[j]] = Float.NEGATIVE_INFINITY
            }
        }
        val probs = softmax(logits)
        var r = random.nextDouble()
        for (i in probs.indices) {
            r -= probs[i]
            if (r < 0) return i
        }
        return argmax(logits) // rounding left a sliver: the most likely token
    }

    private fun penalize(logits: FloatArray, seen: IntArray, count: Int) {
        if (config.repetitionPenalty == 1.0 || count == 0) return
        if (mark.size != logits.size) mark = BooleanArray(logits.size)
        val penalty = config.repetitionPenalty.toFloat()
        for (i in 0 until count) {
            val id = seen[i]
            if (id < 0 || id >= logits.size || mark[id]) continue
            mark[id] = true
            val s = logits[id]
            logits[id] = if (s < 0) s * penalty else s / penalty
        }
        for (i in 0 until count) { val id = seen[i]; if (id >= 0 && id < mark.size) mark[id] = false }
    }

    companion object {
        fun argmax(x: FloatArray): Int {
            var best = 0
            for (i in 1 until x.size) if (x[i] > x[best]) best = i
            return best
        }

        fun softmax(x: FloatArray): DoubleArray {
            var max = Float.NEGATIVE_INFINITY
            for (v in x) if (v > max) max = v
            val out = DoubleArray(x.size)
            var sum = 0.0
            for (i in x.indices) { out[i] = Math.exp((x[i] - max).toDouble()); sum += out[i] }
            for (i in out.indices) out[i] /= sum
            return out
        }
    }
}
