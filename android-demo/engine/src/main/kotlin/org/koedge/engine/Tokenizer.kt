package org.koedge.engine

import java.io.File
import java.text.Normalizer
import java.util.PriorityQueue
import java.util.regex.Pattern

/**
 * Encode and decode with a Hugging Face `tokenizer.json`, reimplementing the parts of the `tokenizers`
 * library that koedge bundles use, step for step (its Rust sources are the reference):
 *
 * - models: `Unigram` (Viterbi as `encode_optimized`, unknown runs fused, byte fallback) — Gemma 3 as
 *   converted from GGUF; `BPE` (merges by rank through a heap as `Word::merge_all`, byte fallback, unk,
 *   `ignore_merges`) — Llama / SmolLM2 / GPT-NeoX / Qwen byte-level and SentencePiece-style BPE;
 * - normalizers: Replace (string), Prepend, NFC/NFD/NFKC/NFKD, Lowercase, Sequence;
 * - pre-tokenizers: ByteLevel (GPT-2 regex), Split (string or regex; every behavior), Digits, Metaspace, Sequence;
 * - decoders: ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence;
 * - added tokens matched leftmost-longest before the model (special tokens in a prompt stay one id).
 *
 * Anything else is refused with [UnsupportedTokenizerException] rather than approximated. Vocabulary-pruned
 * bundles need nothing special: their tokenizer.json is a smaller tokenizer of the same kind.
 * Parity with `tokenizers` is checked on every NSMC review and KLUE sentence (tests/test_android_tokenizer.py).
 */
class Tokenizer private constructor(
    private val normalizer: ((String) -> String)?,
    private val preTokenizer: ((List<String>) -> List<String>)?,
    private val model: Model,
    private val decoder: ((List<String>) -> List<String>)?,
    private val added: List<AddedToken>,
    private val pieces: Array<String?>,
) {
    class AddedToken(val id: Int, val content: String, val special: Boolean, val normalized: Boolean)

    internal interface Model {
        fun tokenize(text: String, out: MutableList<Int>)
        fun tokenToId(token: String): Int?
        fun size(): Int
        fun idToToken(id: Int): String?
    }

    private val specialContents: Set<String> = added.filter { it.special }.map { it.content }.toSet()
    private val rawAdded = added.filter { !it.normalized }.sortedWith(compareByDescending<AddedToken> { it.content.length })
    private val normAdded = added.filter { it.normalized }.sortedWith(compareByDescending<AddedToken> { it.content.length })

    val vocabSize: Int get() = pieces.size

    /** Ids of [text] without the post-processor's special tokens (as `encode(text, add_special_tokens=False)`). */
    fun encode(text: String): IntArray {
        val out = ArrayList<Int>()
        for ((segment, addedId) in splitAdded(text, rawAdded)) {
            if (addedId != null) { out.add(addedId); continue }
            val normalized = normalizer?.invoke(segment) ?: segment
            for ((part, normId) in splitAdded(normalized, normAdded)) {
                if (normId != null) { out.add(normId); continue }
                val words = preTokenizer?.invoke(listOf(part)) ?: listOf(part)
                for (word in words) if (word.isNotEmpty()) model.tokenize(word, out)
            }
        }
        return out.toIntArray()
    }

    /** The piece of [id] (added tokens included), or null when the id is outside the vocabulary. */
    fun idToToken(id: Int): String? = if (id in pieces.indices) pieces[id] else null

    fun tokenToId(token: String): Int? = added.firstOrNull { it.content == token }?.id ?: model.tokenToId(token)

    /** Text of [ids] as `Tokenizer.decode(ids, skip_special_tokens)`. */
    fun decode(ids: IntArray, skipSpecialTokens: Boolean = true): String = decode(ids, 0, ids.size, skipSpecialTokens)

    fun decode(ids: IntArray, from: Int, to: Int, skipSpecialTokens: Boolean = true): String {
        val tokens = ArrayList<String>(to - from)
        for (i in from until to) {
            val id = ids[i]
            val piece = idToToken(id) ?: continue
            if (skipSpecialTokens && piece in specialContents) continue
            tokens.add(piece)
        }
        val chain = decoder ?: return tokens.joinToString(" ")
        return chain(tokens).joinToString("")
    }

    private fun splitAdded(text: String, tokens: List<AddedToken>): List<Pair<String, Int?>> {
        if (tokens.isEmpty() || text.isEmpty()) return listOf(Pair(text, null))
        val out = ArrayList<Pair<String, Int?>>()
        var start = 0
        var i = 0
        while (i < text.length) {
            // leftmost-longest: at the first position where any token matches, take the longest one
            val hit = tokens.firstOrNull { text.startsWith(it.content, i) }
            if (hit == null) { i++; continue }
            if (i > start) out.add(Pair(text.substring(start, i), null))
            out.add(Pair(hit.content, hit.id))
            i += hit.content.length
            start = i
        }
        if (start < text.length) out.add(Pair(text.substring(start), null))
        return out
    }

    companion object {
        fun fromFile(file: File): Tokenizer {
            if (!file.isFile) throw UnsupportedTokenizerException("no ${file.name} in ${file.parentFile}")
            val data = try {
                Json.parse(file.readText(Charsets.UTF_8)).obj("tokenizer.json")
            } catch (err: IllegalArgumentException) {
                throw CorruptBundleException("$file is corrupt: ${err.message}")
            }
            return fromJson(data)
        }

        fun fromJson(data: Map<String, Any?>): Tokenizer {
            val modelJson = data["model"].obj("model")
            val model: Model = when (val type = modelJson["type"]) {
                "Unigram" -> Unigram(modelJson)
                "BPE" -> Bpe(modelJson)
                else -> throw UnsupportedTokenizerException("tokenizer model '$type' is not supported (Unigram and BPE are)")
            }
            val added = (data["added_tokens"] as? List<*> ?: emptyList<Any?>()).map {
                val token = it.obj("added token")
                for (flag in listOf("lstrip", "rstrip", "single_word")) {
                    if (token[flag] == true) {
                        throw UnsupportedTokenizerException("added token '${token["content"]}' uses $flag, which is not supported")
                    }
                }
                AddedToken(token["id"].int("id"), token["content"].str("content"), token["special"] == true,
                    token["normalized"] == true)
            }
            val size = maxOf(model.size(), (added.maxOfOrNull { it.id } ?: -1) + 1)
            val pieces = arrayOfNulls<String>(size)
            for (i in 0 until model.size()) pieces[i] = model.idToToken(i)
            for (token in added) pieces[token.id] = token.content
            return Tokenizer(
                data["normalizer"]?.let { normalizer(it.obj("normalizer")) },
                data["pre_tokenizer"]?.let { preTokenizer(it.obj("pre_tokenizer")) },
                model,
                data["decoder"]?.let { decoder(it.obj("decoder")) },
                added,
                pieces,
            )
        }

        // --- normalizers ------------------------------------------------------------------------------------------
        private fun normalizer(json: Map<String, Any?>): (String) -> String = when (val type = json["type"]) {
            "Sequence" -> {
                val steps = json["normalizers"].arr("normalizers").map { normalizer(it.obj("normalizer")) }
                val f: (String) -> String = { text -> steps.fold(text) { acc, step -> step(acc) } }
                f
            }
            "Replace" -> {
                val pattern = stringPattern(json, "normalizer Replace")
                val content = json["content"].str("content");
                { text: String -> text.replace(pattern, content) }
            }
            "Prepend" -> {
                val prepend = json["prepend"].str("prepend");
                { text: String -> if (text.isEmpty()) text else prepend + text }
            }
            "NFC" -> { text: String -> Normalizer.normalize(text, Normalizer.Form.NFC) }
            "NFD" -> { text: String -> Normalizer.normalize(text, Normalizer.Form.NFD) }
            "NFKC" -> { text: String -> Normalizer.normalize(text, Normalizer.Form.NFKC) }
            "NFKD" -> { text: String -> Normalizer.normalize(text, Normalizer.Form.NFKD) }
            "Lowercase" -> { text: String -> text.lowercase(java.util.Locale.ROOT) }
            else -> throw UnsupportedTokenizerException("normalizer '$type' is not supported")
        }

        private fun stringPattern(json: Map<String, Any?>, what: String): String {
            val pattern = json["pattern"].obj("pattern")
            return pattern["String"] as? String
                ?: throw UnsupportedTokenizerException("$what with a regex pattern is not supported")
        }

        // --- pre-tokenizers ---------------------------------------------------------------------------------------
        /** The GPT-2 split of the ByteLevel pre-tokenizer; (?U): \s is Unicode White_Space, as Oniguruma's. */
        private val GPT2 = Pattern.compile(
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
            Pattern.UNICODE_CHARACTER_CLASS)

        private fun preTokenizer(json: Map<String, Any?>): (List<String>) -> List<String> = when (val type = json["type"]) {
            "Sequence" -> {
                val steps = json["pretokenizers"].arr("pretokenizers").map { preTokenizer(it.obj("pre-tokenizer")) }
                val f: (List<String>) -> List<String> = { words -> steps.fold(words) { acc, step -> step(acc) } }
                f
            }
            "ByteLevel" -> {
                val prefix = json["add_prefix_space"] == true
                val regex = json["use_regex"] != false;
                { words: List<String> ->
                    words.flatMap { word ->
                        val w = if (prefix && !word.startsWith(" ")) " $word" else word
                        (if (regex) splitPattern(w, GPT2, "Isolated", false) else listOf(w)).map(ByteLevel::encode)
                    }
                }
            }
            "Split" -> {
                val behavior = json["behavior"].str("behavior")
                val invert = json["invert"] == true
                val patternJson = json["pattern"].obj("pattern")
                val pattern = (patternJson["String"] as? String)?.let { Pattern.compile(Pattern.quote(it)) }
                    ?: (patternJson["Regex"] as? String)?.let { Pattern.compile(it, Pattern.UNICODE_CHARACTER_CLASS) }
                    ?: throw UnsupportedTokenizerException("Split pattern $patternJson is not supported");
                { words: List<String> -> words.flatMap { splitPattern(it, pattern, behavior, invert) } }
            }
            "Digits" -> {
                val individual = json["individual_digits"] == true;
                { words: List<String> ->
                    words.flatMap { splitChars(it, ::isNumeric, if (individual) "Isolated" else "Contiguous") }
                }
            }
            "Metaspace" -> {
                val replacement = json["replacement"].str("replacement")
                val scheme = (json["prepend_scheme"] as? String) ?: if (json["add_prefix_space"] == false) "never" else "always"
                val split = json["split"] != false
                if (scheme == "first") throw UnsupportedTokenizerException("Metaspace prepend_scheme 'first' is not supported");
                { words: List<String> ->
                    words.flatMap { word ->
                        var w = word.replace(" ", replacement)
                        if (scheme == "always" && !w.startsWith(replacement)) w = replacement + w
                        if (split) splitPattern(w, Pattern.compile(Pattern.quote(replacement)), "MergedWithNext", false) else listOf(w)
                    }
                }
            }
            else -> throw UnsupportedTokenizerException("pre-tokenizer '$type' is not supported")
        }

        private fun isNumeric(cp: Int): Boolean {
            val t = Character.getType(cp)
            return t == Character.DECIMAL_DIGIT_NUMBER.toInt() || t == Character.LETTER_NUMBER.toInt() ||
                t == Character.OTHER_NUMBER.toInt()
        }

        /** Spans (start, end, isMatch) of [text] for [pattern] (non-empty matches), as `tokenizers`' find_matches. */
        private fun spans(text: String, pattern: Pattern, invert: Boolean): List<Triple<Int, Int, Boolean>> {
            val out = ArrayList<Triple<Int, Int, Boolean>>()
            val m = pattern.matcher(text)
            var prev = 0
            while (m.find()) {
                if (m.end() == m.start()) continue
                if (m.start() > prev) out.add(Triple(prev, m.start(), false))
                out.add(Triple(m.start(), m.end(), true))
                prev = m.end()
            }
            if (prev < text.length) out.add(Triple(prev, text.length, false))
            return if (invert) out.map { Triple(it.first, it.second, !it.third) } else out
        }

        internal fun splitPattern(text: String, pattern: Pattern, behavior: String, invert: Boolean): List<String> {
            if (text.isEmpty()) return emptyList()
            return applyBehavior(text, spans(text, pattern, invert), behavior)
        }

        /** Spans of a character predicate as `tokenizers`' `Fn(char) -> bool` pattern: each matching character
         *  alone, the runs between them as one span each. */
        private fun splitChars(text: String, test: (Int) -> Boolean, behavior: String): List<String> {
            val spans = ArrayList<Triple<Int, Int, Boolean>>()
            var last = 0
            var i = 0
            while (i < text.length) {
                val cp = text.codePointAt(i)
                val n = Character.charCount(cp)
                if (test(cp)) {
                    if (last < i) spans.add(Triple(last, i, false))
                    spans.add(Triple(i, i + n, true))
                    last = i + n
                }
                i += n
            }
            if (last < text.length) spans.add(Triple(last, text.length, false))
            return applyBehavior(text, spans, behavior)
        }

        /** `SplitDelimiterBehavior` over matched / unmatched spans. */
        private fun applyBehavior(text: String, spans: List<Triple<Int, Int, Boolean>>, behavior: String): List<String> {
            val out = ArrayList<String>()
            when (behavior) {
                "Isolated" -> spans.forEach { out.add(text.substring(it.first, it.second)) }
                "Removed" -> spans.filter { !it.third }.forEach { out.add(text.substring(it.first, it.second)) }
                "MergedWithPrevious" -> {
                    var start = -1
                    for ((s, e, match) in spans) {
                        if (start < 0) start = s
                        if (match) { out.add(text.substring(start, e)); start = -1 }
                    }
                    if (start >= 0) out.add(text.substring(start))
                }
                "MergedWithNext" -> {
                    var start = -1
                    for ((s, e, match) in spans) {
                        if (match && start >= 0) { out.add(text.substring(start, s)); start = s }
                        if (start < 0) start = s
                    }
                    if (start >= 0) out.add(text.substring(start))
                }
                "Contiguous" -> {
                    var start = -1
                    var kind = false
                    for ((st, _, match) in spans) {
                        if (start >= 0 && match != kind) { out.add(text.substring(start, st)); start = -1 }
                        if (start < 0) { start = st; kind = match }
                    }
                    if (start >= 0) out.add(text.substring(start))
                }
                else -> throw UnsupportedTokenizerException("split behavior '$behavior' is not supported")
            }
            return out.filter { it.isNotEmpty() }
        }

        // --- decoders ---------------------------------------------------------------------------------------------
        private fun decoder(json: Map<String, Any?>): (List<String>) -> List<String> = when (val type = json["type"]) {
            "Sequence" -> {
                val steps = json["decoders"].arr("decoders").map { decoder(it.obj("decoder")) }
                val f: (List<String>) -> List<String> = { tokens -> steps.fold(tokens) { acc, step -> step(acc) } }
                f
            }
            "ByteLevel" -> { tokens: List<String> -> listOf(ByteLevel.decode(tokens)) }
            "ByteFallback" -> ::byteFallback
            "Fuse" -> { tokens: List<String> -> listOf(tokens.joinToString("")) }
            "Replace" -> {
                val pattern = stringPattern(json, "decoder Replace")
                val content = json["content"].str("content");
                { tokens: List<String> -> tokens.map { it.replace(pattern, content) } }
            }
            "Strip" -> {
                val content = json["content"].str("content")
                val start = json["start"].int("start")
                val stop = json["stop"].int("stop");
                { tokens: List<String> -> tokens.map { strip(it, content, start, stop) } }
            }
            "Metaspace" -> {
                val replacement = json["replacement"].str("replacement")
                val scheme = (json["prepend_scheme"] as? String) ?: if (json["add_prefix_space"] == false) "never" else "always";
                { tokens: List<String> ->
                    tokens.mapIndexed { i, token ->
                        val t = token.replace(replacement, " ")
                        if (i == 0 && scheme != "never" && t.startsWith(" ")) t.substring(1) else t
                    }
                }
            }
            else -> throw UnsupportedTokenizerException("decoder '$type' is not supported")
        }

        private fun strip(token: String, content: String, start: Int, stop: Int): String {
            var s = token
            var n = 0
            while (n < start && s.startsWith(content)) { s = s.substring(content.length); n++ }
            n = 0
            while (n < stop && s.endsWith(content)) { s = s.substring(0, s.length - content.length); n++ }
            return s
        }

        private fun byteOf(token: String): Int {
            if (token.length != 6 || !token.startsWith("<0x") || !token.endsWith(">")) return -1
            return token.substring(3, 5).toIntOrNull(16) ?: -1
        }

        /** `<0xEA><0xB9><0xB0>` -> the character when the bytes are valid UTF-8, else one U+FFFD per byte. */
        private fun byteFallback(tokens: List<String>): List<String> {
            val out = ArrayList<String>(tokens.size)
            val pending = java.io.ByteArrayOutputStream()
            fun flush() {
                if (pending.size() == 0) return
                val bytes = pending.toByteArray()
                val text = Utf8.strict(bytes)
                if (text != null) out.add(text) else repeat(bytes.size) { out.add("\uFFFD") }
                pending.reset()
            }
            for (token in tokens) {
                val b = byteOf(token)
                if (b >= 0) pending.write(b) else { flush(); out.add(token) }
            }
            flush()
            return out
        }

        internal fun byteToken(b: Int): String = "<0x" + String.format("%02X", b) + ">"
    }

    // --- Unigram ------------------------------------------------------------------------------------------------------
    private class Unigram(json: Map<String, Any?>) : Model {
        private val vocab: Array<String>
        private val scores: DoubleArray
        private val ids = HashMap<String, Int>()
        private val unkId: Int? = (json["unk_id"] as? Number)?.toInt()
        private val byteFallback = json["byte_fallback"] == true
        private val trie = CharTrie()
        private val unkScore: Double

        init {
            val list = json["vocab"].arr("vocab")
            vocab = Array(list.size) { "" }
            scores = DoubleArray(list.size)
            var min = Double.POSITIVE_INFINITY
            for ((i, item) in list.withIndex()) {
                val pair = item.arr("vocab entry")
                vocab[i] = pair[0].str("piece")
                scores[i] = (pair[1] as Number).toDouble()
                ids[vocab[i]] = i // a repeated piece: the last id wins, as the Rust HashMap
                if (scores[i] < min) min = scores[i]
                trie.insert(vocab[i], i)
            }
            unkScore = min - 10.0 // K_UNK_PENALTY
        }

        override fun size() = vocab.size
        override fun idToToken(id: Int): String? = if (id in vocab.indices) vocab[id] else null
        override fun tokenToId(token: String): Int? = ids[token]

        override fun tokenize(text: String, out: MutableList<Int>) {
            for (piece in encodePieces(text)) {
                val id = ids[piece]
                if (id != null) { out.add(id); continue }
                if (byteFallback) {
                    val bytes = piece.toByteArray(Charsets.UTF_8)
                    val byteIds = bytes.map { ids[byteToken(it.toInt() and 0xFF)] }
                    if (byteIds.all { it != null }) { byteIds.forEach { out.add(it!!) }; continue }
                }
                out.add(unkId ?: throw UnsupportedTokenizerException("Unigram tokenizer without an unk id met an unknown piece"))
            }
        }

        /** `Unigram::encode_optimized`: best path over character positions, unknown runs fused. */
        private fun encodePieces(text: String): List<String> {
            val n = text.length
            if (n == 0) return emptyList()
            val bestScore = DoubleArray(n + 1)
            val startsAt = IntArray(n + 1) { -1 }
            val nodeId = IntArray(n + 1)
            var pos = 0
            while (pos < n) {
                val base = bestScore[pos]
                val charLen = Character.charCount(text.codePointAt(pos))
                var single = false
                var node = 0
                var at = pos
                while (at < n) {
                    node = trie.child(node, text[at])
                    if (node < 0) break
                    at++
                    val id = trie.value(node)
                    if (id >= 0) {
                        val candidate = scores[id] + base
                        if (startsAt[at] < 0 || candidate > bestScore[at]) {
                            bestScore[at] = candidate; startsAt[at] = pos; nodeId[at] = id
                        }
                        if (!single && at - pos == charLen) single = true
                    }
                }
                if (!single) {
                    val end = pos + charLen
                    val candidate = unkScore + base
                    if (startsAt[end] < 0 || candidate > bestScore[end]) {
                        bestScore[end] = candidate; startsAt[end] = pos
                        nodeId[end] = unkId ?: throw UnsupportedTokenizerException("Unigram tokenizer without an unk id")
                    }
                }
                pos += charLen
            }
            val results = ArrayList<String>()
            val unk = ArrayList<String>()
            var end = n
            while (end > 0) {
                val start = startsAt[end]
                if (unkId != null && nodeId[end] == unkId) {
                    unk.add(text.substring(start, end))
                } else {
                    if (unk.isNotEmpty()) { results.add(unk.asReversed().joinToString("")); unk.clear() }
                    results.add(text.substring(start, end))
                }
                end = start
            }
            if (unk.isNotEmpty()) results.add(unk.asReversed().joinToString(""))
            results.reverse()
            return results
        }
    }

    // --- BPE ----------------------------------------------------------------------------------------------------------
    private class Bpe(json: Map<String, Any?>) : Model {
        private val vocab = HashMap<String, Int>()
        private val pieces: Array<String?>
        private val merges = HashMap<Long, Long>() // (a << 32 | b) -> (rank << 32 | new id)
        private val unkToken = json["unk_token"] as? String
        private val fuseUnk = json["fuse_unk"] == true
        private val byteFallback = json["byte_fallback"] == true
        private val ignoreMerges = json["ignore_merges"] == true
        private val prefix = json["continuing_subword_prefix"] as? String
        private val suffix = json["end_of_word_suffix"] as? String

        init {
            if (json["dropout"] != null && (json["dropout"] as? Number)?.toDouble() != 0.0) {
                throw UnsupportedTokenizerException("BPE dropout is not supported")
            }
            val vocabJson = json["vocab"].obj("vocab")
            var size = 0
            for ((piece, id) in vocabJson) {
                vocab[piece] = id.int("id")
                size = maxOf(size, id.int("id") + 1)
            }
            pieces = arrayOfNulls(size)
            for ((piece, id) in vocab) pieces[id] = piece
            val prefixLen = prefix?.length ?: 0
            for ((rank, item) in json["merges"].arr("merges").withIndex()) {
                val (a, b) = if (item is String) {
                    val space = item.indexOf(' ')
                    if (space < 0) throw CorruptBundleException("bad BPE merge '$item'")
                    Pair(item.substring(0, space), item.substring(space + 1))
                } else {
                    val pair = item.arr("merge")
                    Pair(pair[0].str("merge"), pair[1].str("merge"))
                }
                val idA = vocab[a] ?: throw CorruptBundleException("BPE merge uses unknown piece '$a'")
                val idB = vocab[b] ?: throw CorruptBundleException("BPE merge uses unknown piece '$b'")
                val joined = a + (if (prefixLen > 0 && b.startsWith(prefix!!)) b.substring(prefixLen) else b)
                val newId = vocab[joined] ?: throw CorruptBundleException("BPE merge result '$joined' is not in the vocabulary")
                merges[(idA.toLong() shl 32) or idB.toLong()] = (rank.toLong() shl 32) or newId.toLong()
            }
        }

        override fun size() = pieces.size
        override fun idToToken(id: Int): String? = if (id in pieces.indices) pieces[id] else null
        override fun tokenToId(token: String): Int? = vocab[token]

        override fun tokenize(text: String, out: MutableList<Int>) {
            if (text.isEmpty()) return
            if (ignoreMerges) vocab[text]?.let { out.add(it); return }
            // Word::add per character (merge_word)
            val symbols = ArrayList<Int>()
            var unk: Int? = null
            var i = 0
            while (i < text.length) {
                val cp = text.codePointAt(i)
                val next = i + Character.charCount(cp)
                var s = text.substring(i, next)
                if (i > 0 && prefix != null) s = prefix + s
                if (next == text.length && suffix != null) s += suffix
                val id = vocab[s]
                if (id != null) {
                    if (unk != null) { symbols.add(unk); unk = null }
                    symbols.add(id)
                } else {
                    var handled = false
                    if (byteFallback) {
                        val bytes = s.toByteArray(Charsets.UTF_8).map { vocab[byteToken(it.toInt() and 0xFF)] }
                        if (bytes.all { it != null }) { bytes.forEach { symbols.add(it!!) }; handled = true }
                    }
                    if (!handled && unkToken != null) {
                        val unkId = vocab[unkToken] ?: throw CorruptBundleException("BPE unk token '$unkToken' is not in the vocabulary")
                        if (unk != null && !fuseUnk) symbols.add(unk)
                        unk = unkId
                    }
                }
                i = next
            }
            if (unk != null) symbols.add(unk)
            mergeAll(symbols, out)
        }

        private class Merge(val pos: Int, val rank: Int, val newId: Int)

        /** `Word::merge_all`: lowest rank first, then leftmost; stale heap entries skipped. */
        private fun mergeAll(initial: List<Int>, out: MutableList<Int>) {
            val n = initial.size
            val c = initial.toIntArray()
            val prev = IntArray(n) { it - 1 }
            val next = IntArray(n) { if (it + 1 < n) it + 1 else -1 }
            val alive = BooleanArray(n) { true }
            val queue = PriorityQueue<Merge>(maxOf(1, n), compareBy<Merge>({ it.rank }, { it.pos }))
            for (p in 0 until n - 1) {
                merges[(c[p].toLong() shl 32) or c[p + 1].toLong()]?.let { queue.add(Merge(p, (it ushr 32).toInt(), it.toInt())) }
            }
            while (queue.isNotEmpty()) {
                val top = queue.poll()
                if (!alive[top.pos]) continue
                val right = next[top.pos]
                if (right < 0) continue
                val m = merges[(c[top.pos].toLong() shl 32) or c[right].toLong()]
                if (m == null || m.toInt() != top.newId) continue
                c[top.pos] = top.newId
                alive[right] = false
                next[top.pos] = next[right]
                if (next[right] >= 0) prev[next[right]] = top.pos
                val p = prev[top.pos]
                if (p >= 0) merges[(c[p].toLong() shl 32) or c[top.pos].toLong()]?.let {
                    queue.add(Merge(p, (it ushr 32).toInt(), it.toInt()))
                }
                val q = next[top.pos]
                if (q >= 0) merges[(c[top.pos].toLong() shl 32) or c[q].toLong()]?.let {
                    queue.add(Merge(top.pos, (it ushr 32).toInt(), it.toInt()))
                }
            }
            for (p in 0 until n) if (alive[p]) out.add(c[p])
        }
    }
}

/** GPT-2's byte <-> printable character map (ByteLevel pre-tokenizer and decoder). */
internal object ByteLevel {
    private val byteToChar = CharArray(256)
    private val charToByte = HashMap<Char, Int>()

    init {
        val direct = (33..126) + (161..172) + (174..255)
        var extra = 0
        for (b in 0 until 256) {
            val ch = if (b in direct) b.toChar() else (256 + extra++).toChar()
            byteToChar[b] = ch
            charToByte[ch] = b
        }
    }

    fun encode(text: String): String {
        val bytes = text.toByteArray(Charsets.UTF_8)
        val out = CharArray(bytes.size)
        for (i in bytes.indices) out[i] = byteToChar[bytes[i].toInt() and 0xFF]
        return String(out)
    }

    /** Tokens back to bytes (a token with a character outside the map keeps its own UTF-8), decoded lossily. */
    fun decode(tokens: List<String>): String {
        val bytes = java.io.ByteArrayOutputStream()
        for (token in tokens) {
            val mapped = ByteArray(token.length)
            var ok = true
            for (i in token.indices) {
                val b = charToByte[token[i]]
                if (b == null) { ok = false; break }
                mapped[i] = b.toByte()
            }
            if (ok) bytes.write(mapped, 0, mapped.size) else token.toByteArray(Charsets.UTF_8).let { bytes.write(it, 0, it.size) }
        }
        return Utf8.lossy(bytes.toByteArray())
    }
}

/** UTF-8 decoding with Rust's rules: [lossy] = `String::from_utf8_lossy` (one U+FFFD per maximal invalid subpart). */
internal object Utf8 {
    fun strict(bytes: ByteArray): String? {
        val out = StringBuilder()
        return if (decode(bytes, out, strict = true)) out.toString() else null
    }

    fun lossy(bytes: ByteArray): String {
        val out = StringBuilder(bytes.size)
        decode(bytes, out, strict = false)
        return out.toString()
    }

    private fun decode(b: ByteArray, out: StringBuilder, strict: Boolean): Boolean {
        var i = 0
        val n = b.size
        while (i < n) {
            val b0 = b[i].toInt() and 0xFF
            if (b0 < 0x80) { out.append(b0.toChar()); i++; continue }
            val need: Int
            var lo = 0x80
            var hi = 0xBF
            when (b0) {
                in 0xC2..0xDF -> need = 1
                0xE0 -> { need = 2; lo = 0xA0 }
                in 0xE1..0xEC, 0xEE, 0xEF -> need = 2
                0xED -> { need = 2; hi = 0x9F }
                0xF0 -> { need = 3; lo = 0x90 }
                in 0xF1..0xF3 -> need = 3
                0xF4 -> { need = 3; hi = 0x8F }
                else -> { if (strict) return false; out.append('\uFFFD'); i++; continue }
            }
            var cp = b0 and (0x3F shr need)
            var j = 1
            var valid = true
            while (j <= need) {
                if (i + j >= n) { valid = false; break }
                val bj = b[i + j].toInt() and 0xFF
                val l = if (j == 1) lo else 0x80
                val h = if (j == 1) hi else 0xBF
                if (bj < l || bj > h) { valid = false; break }
                cp = (cp shl 6) or (bj and 0x3F)
                j++
            }
            if (!valid) { if (strict) return false; out.append('\uFFFD'); i += j; continue }
            out.appendCodePoint(cp)
            i += need + 1
        }
        return true
    }
}

/** A trie over UTF-16 units in two flat hash arrays (node, char) -> child: ~12 bytes per edge, no objects. */
internal class CharTrie {
    private var keys = LongArray(1 shl 16) { -1L }
    private var children = IntArray(1 shl 16)
    private var values = IntArray(1024) { -1 }
    private var nodes = 1
    private var used = 0

    fun child(node: Int, ch: Char): Int {
        val key = (node.toLong() shl 16) or ch.code.toLong()
        var slot = mix(key) and (keys.size - 1)
        while (true) {
            val k = keys[slot]
            if (k == -1L) return -1
            if (k == key) return children[slot]
            slot = (slot + 1) and (keys.size - 1)
        }
    }

    fun value(node: Int): Int = values[node]

    fun insert(piece: String, id: Int) {
        var node = 0
        for (ch in piece) {
            var next = child(node, ch)
            if (next < 0) {
                next = nodes++
                if (next >= values.size) values = values.copyOf(values.size * 2).also { it.fill(-1, values.size, it.size) }
                put((node.toLong() shl 16) or ch.code.toLong(), next)
            }
            node = next
        }
        values[node] = id
    }

    private fun put(key: Long, child: Int) {
        if ((used + 1) * 2 > keys.size) grow()
        var slot = mix(key) and (keys.size - 1)
        while (keys[slot] != -1L) slot = (slot + 1) and (keys.size - 1)
        keys[slot] = key
        children[slot] = child
        used++
    }

    private fun grow() {
        val oldKeys = keys
        val oldChildren = children
        keys = LongArray(oldKeys.size * 2) { -1L }
        children = IntArray(oldKeys.size * 2)
        used = 0
        for (i in oldKeys.indices) if (oldKeys[i] != -1L) put(oldKeys[i], oldChildren[i])
    }

    private fun mix(key: Long): Int {
        var h = key * -0x61c8864680b583ebL
        h = h xor (h ushr 29)
        return h.toInt()
    }
}
