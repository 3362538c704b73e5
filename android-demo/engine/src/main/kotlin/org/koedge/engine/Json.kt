package org.koedge.engine

/**
 * A small JSON reader (RFC 8259) so the engine needs no library on the phone: objects become
 * [LinkedHashMap], arrays [ArrayList], numbers [Long] when integral else [Double], plus String,
 * Boolean and null. Big files (a 262k-piece tokenizer.json, ~30 MB) parse in one pass over a String.
 */
class Json private constructor(private val text: String) {
    private var at = 0

    companion object {
        fun parse(text: String): Any? {
            val reader = Json(text)
            reader.skipSpace()
            val value = reader.value()
            reader.skipSpace()
            if (reader.at != text.length) throw reader.fail("trailing characters")
            return value
        }
    }

    private fun fail(message: String) = IllegalArgumentException("JSON: $message at offset $at")

    private fun skipSpace() {
        while (at < text.length) {
            val c = text[at]
            if (c == ' ' || c == '\n' || c == '\r' || c == '\t') at++ else break
        }
    }

    private fun value(): Any? {
        if (at >= text.length) throw fail("unexpected end")
        return when (val c = text[at]) {
            '{' -> obj()
            '[' -> array()
            '"' -> string()
            't' -> literal("true", true)
            'f' -> literal("false", false)
            'n' -> literal("null", null)
            else -> if (c == '-' || c in '0'..'9') number() else throw fail("unexpected '$c'")
        }
    }

    private fun literal(word: String, result: Any?): Any? {
        if (!text.startsWith(word, at)) throw fail("expected $word")
        at += word.length
        return result
    }

    private fun obj(): Map<String, Any?> {
        val out = LinkedHashMap<String, Any?>()
        at++
        skipSpace()
        if (at < text.length && text[at] == '}') { at++; return out }
        while (true) {
            skipSpace()
            if (at >= text.length || text[at] != '"') throw fail("expected a key")
            val key = string()
            skipSpace()
            if (at >= text.length || text[at] != ':') throw fail("expected ':'")
            at++
            skipSpace()
            out[key] = value()
            skipSpace()
            if (at >= text.length) throw fail("unexpected end")
            when (text[at++]) {
                ',' -> continue
                '}' -> return out
                else -> { at--; throw fail("expected ',' or '}'") }
            }
        }
    }

    private fun array(): List<Any?> {
        val out = ArrayList<Any?>()
        at++
        skipSpace()
        if (at < text.length && text[at] == ']') { at++; return out }
        while (true) {
            skipSpace()
            out.add(value())
            skipSpace()
            if (at >= text.length) throw fail("unexpected end")
            when (text[at++]) {
                ',' -> continue
                ']' -> return out
                else -> { at--; throw fail("expected ',' or ']'") }
            }
        }
    }

    private fun string(): String {
        at++ // opening quote
        val start = at
        while (at < text.length) { // fast path: no escapes
            val c = text[at]
            if (c == '"') { val s = text.substring(start, at); at++; return s }
            if (c == '\\') break
            at++
        }
        val out = StringBuilder().append(text, start, at)
        while (at < text.length) {
            val c = text[at++]
            when (c) {
                '"' -> return out.toString()
                '\\' -> {
                    if (at >= text.length) throw fail("unexpected end in a string")
                    when (val e = text[at++]) {
                        '"' -> out.append('"'); '\\' -> out.append('\\'); '/' -> out.append('/')
                        'b' -> out.append('\b'); 'f' -> out.append('\u000C'); 'n' -> out.append('\n')
                        'r' -> out.append('\r'); 't' -> out.append('\t')
                        'u' -> {
                            if (at + 4 > text.length) throw fail("short \\u escape")
                            out.append(text.substring(at, at + 4).toInt(16).toChar())
                            at += 4
                        }
                        else -> throw fail("bad escape \\$e")
                    }
                }
                else -> out.append(c)
            }
        }
        throw fail("unterminated string")
    }

    private fun number(): Any {
        val start = at
        if (text[at] == '-') at++
        var integral = true
        while (at < text.length) {
            val c = text[at]
            if (c in '0'..'9') at++
            else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { integral = false; at++ }
            else break
        }
        val s = text.substring(start, at)
        return try {
            if (integral) s.toLong() else s.toDouble()
        } catch (err: NumberFormatException) {
            throw fail("bad number '$s'")
        }
    }
}

@Suppress("UNCHECKED_CAST")
internal fun Any?.obj(what: String): Map<String, Any?> =
    this as? Map<String, Any?> ?: throw IllegalArgumentException("$what is not a JSON object")

@Suppress("UNCHECKED_CAST")
internal fun Any?.arr(what: String): List<Any?> =
    this as? List<Any?> ?: throw IllegalArgumentException("$what is not a JSON array")

internal fun Any?.int(what: String): Int =
    (this as? Number)?.toInt() ?: throw IllegalArgumentException("$what is not a number")

internal fun Any?.str(what: String): String =
    this as? String ?: throw IllegalArgumentException("$what is not a string")

internal fun Json.Companion.quote(text: String): String {
    val out = StringBuilder("\"")
    for (c in text) when {
        c == '"' -> out.append("\\\"")
        c == '\\' -> out.append("\\\\")
        c == '\n' -> out.append("\\n")
        c < ' ' -> out.append(String.format("\\u%04x", c.code))
        else -> out.append(c)
    }
    return out.append('"').toString()
}
