package org.koedge.engine

import java.io.File
import java.io.FileDescriptor
import java.io.FileOutputStream
import java.io.PrintStream
import kotlin.system.exitProcess

private const val USAGE = """usage: java -jar koedge-engine.jar BUNDLE PROMPT [options]
       java -jar koedge-engine.jar BUNDLE --prompt-file FILE [options]
  Continue PROMPT with the bundle and stream the text, as `koedge run` does (greedy by default);
  the timing line goes to stderr.
options:
  --max-new-tokens N      most tokens to generate (default 128)
  --temperature T         0 = greedy (default)
  --top-k K  --top-p P    sampling filters (0 / 1 = off)
  --repetition-penalty R  > 1 discourages repeats (default 1 = off)
  --seed S                random seed for sampling (java.util.SplittableRandom: not numpy's stream)
  --stop TEXT             stop at this text (repeatable)
  --ignore-eos            do not stop at the end-of-sequence token
  --chat                  the prompt as one user turn in the bundle's chat format (manifest tokens.chat_format)
  --threads N             onnxruntime threads (default: all cores)
  --prefill-chunk N|auto  prompt tokens per call (default auto, as the Python runtime; 0 = one call)
  --prompt-file FILE      read the prompt from a UTF-8 file (onnxruntime 1.29's Java library crashes with
                          SIGSEGV when the process command line is longer than about 4 KB)
  --verify                check every file's sha256 against the manifest (sizes are always checked)
  --ids                   also print the prompt and generated token ids as JSON on stderr
  -v, --verbose           prefill time, KV bytes and peak RSS in the timing line
or: java -jar koedge-engine.jar --check-tokenizer TOKENIZER_JSON REFERENCE_JSONL
  Compare encode and decode with reference lines {"text": ..., "ids": [...], "decoded": ...}; exit 1 on any difference."""

fun main(args: Array<String>) {
    val out = PrintStream(FileOutputStream(FileDescriptor.out), true, "UTF-8")
    val err = PrintStream(FileOutputStream(FileDescriptor.err), true, "UTF-8")
    val code = try {
        if (args.isNotEmpty() && args[0] == "--check-tokenizer") checkTokenizer(args.drop(1), out)
        else run(args.toList(), out, err)
    } catch (e: KoedgeException) {
        err.println("koedge: ${e.message}")
        1
    } catch (e: UsageException) {
        err.println("koedge: ${e.message}\n$USAGE")
        2
    }
    out.flush()
    err.flush()
    exitProcess(code)
}

private class UsageException(message: String) : Exception(message)

private fun run(args: List<String>, out: PrintStream, err: PrintStream): Int {
    val positional = ArrayList<String>()
    var maxNew = 128
    var temperature = 0.0
    var topK = 0
    var topP = 1.0
    var penalty = 1.0
    var seed: Long? = null
    val stop = ArrayList<String>()
    var ignoreEos = false
    var threads = 0
    var chunk = EngineOptions.AUTO
    var verify = false
    var printIds = false
    var verbose = false
    var chat = false
    var promptFile: String? = null
    var i = 0
    fun value(name: String): String {
        if (i + 1 >= args.size) throw UsageException("$name needs a value")
        i++
        return args[i]
    }
    fun number(name: String, text: String): Double = text.toDoubleOrNull() ?: throw UsageException("$name: '$text' is not a number")
    while (i < args.size) {
        when (val a = args[i]) {
            "--max-new-tokens" -> maxNew = number(a, value(a)).toInt()
            "--temperature" -> temperature = number(a, value(a))
            "--top-k" -> topK = number(a, value(a)).toInt()
            "--top-p" -> topP = number(a, value(a))
            "--repetition-penalty" -> penalty = number(a, value(a))
            "--seed" -> seed = number(a, value(a)).toLong()
            "--stop" -> stop.add(value(a))
            "--ignore-eos" -> ignoreEos = true
            "--threads" -> threads = number(a, value(a)).toInt()
            "--prefill-chunk" -> {
                val v = value(a)
                chunk = if (v == "auto") EngineOptions.AUTO else v.toIntOrNull()?.takeIf { it >= 0 }
                    ?: throw UsageException("--prefill-chunk: a number of tokens (0 = one call) or 'auto'")
            }
            "--verify" -> verify = true
            "--prompt-file" -> promptFile = value(a)
            "--ids" -> printIds = true
            "-v", "--verbose" -> verbose = true
            "-h", "--help" -> { out.println(USAGE); return 0 }
            "--chat" -> chat = true
            else -> if (a.startsWith("--")) throw UsageException("unknown option $a") else positional.add(a)
        }
        i++
    }
    if (promptFile != null) {
        if (positional.size != 1) throw UsageException("expected BUNDLE and --prompt-file FILE, not a PROMPT too")
        val file = File(promptFile)
        if (!file.isFile) throw UsageException("prompt file $promptFile not found")
        positional.add(file.readText(Charsets.UTF_8))
    }
    if (positional.size != 2) throw UsageException("expected BUNDLE and PROMPT")
    Engine(File(positional[0]), EngineOptions(threads, verify, chunk)).use { engine ->
        // --chat: the prompt as one user turn in the bundle's chat format (as `koedge run --chat` renders it);
        // the template writes any BOS itself, and the reply also stops at the end-of-turn tokens
        val format = if (chat) engine.manifest.tokens.chatFormat
            ?: throw UsageException("this bundle has no chat turn format (no chat template, or one that is not fixed text)")
            else null
        val config = SamplingConfig(maxNew, temperature, topK, topP, penalty, seed, stop, !ignoreEos,
            format?.endOfTurnIds ?: emptyList())
        config.check()
        val ids = if (format != null) engine.encode(format.prompt(listOf(positional[1])), addBos = false)
            else engine.encode(positional[1])
        engine.checkPrompt(ids)
        if (format == null) out.print(positional[1])
        out.flush()
        val result = engine.generate(ids, config) { piece -> out.print(piece); out.flush() }
        out.print("\n")
        out.flush()
        var line = result.timingLine()
        if (verbose) {
            line += String.format(java.util.Locale.ROOT, " · prefill %.2f s · KV %.1f MiB", result.prefillSeconds,
                result.kvBytes / 1048576.0)
            Memory.peakRss()?.let { line += String.format(java.util.Locale.ROOT, " · peak RSS %,d MiB", it / 1048576) }
            if (engine.stepCount > 0) {
                line += String.format(java.util.Locale.ROOT, " · per step %.2f ms, of it outside onnxruntime %.3f ms",
                    engine.stepTotalNanos / 1e6 / engine.stepCount, (engine.stepTotalNanos - engine.stepOrtNanos) / 1e6 / engine.stepCount)
            }
        }
        err.println(line)
        if (printIds) {
            err.println("{\"prompt\": ${result.promptTokens.joinToString(", ", "[", "]")}, " +
                "\"tokens\": ${result.tokens.joinToString(", ", "[", "]")}, \"stop\": \"${result.stopReason}\", " +
                "\"kv_window_offset\": ${engine.windowStart}}")
        }
    }
    return 0
}

/** Tokenizer parity: every reference line's ids from encode, and its decode of those ids. */
private fun checkTokenizer(args: List<String>, out: PrintStream): Int {
    if (args.size != 2) throw UsageException("--check-tokenizer needs TOKENIZER_JSON and REFERENCE_JSONL")
    val started = System.nanoTime()
    val tokenizer = Tokenizer.fromFile(File(args[0]))
    val loaded = (System.nanoTime() - started) / 1e9
    var lines = 0
    var encodeDiff = 0
    var decodeDiff = 0
    var tokens = 0L
    val encodeStart = System.nanoTime()
    File(args[1]).forEachLine(Charsets.UTF_8) { line ->
        if (line.isBlank()) return@forEachLine
        val ref = Json.parse(line).obj("reference line")
        val text = ref["text"].str("text")
        val want = ref["ids"].arr("ids").map { it.int("id") }.toIntArray()
        val got = tokenizer.encode(text)
        lines++
        tokens += want.size
        if (!got.contentEquals(want)) {
            encodeDiff++
            if (encodeDiff <= 5) out.println("ENCODE DIFF: ${Json.quote(text)}\n  want ${want.toList()}\n  got  ${got.toList()}")
        }
        val decoded = ref["decoded"].str("decoded")
        val back = tokenizer.decode(want)
        if (back != decoded) {
            decodeDiff++
            if (decodeDiff <= 5) out.println("DECODE DIFF: ${want.toList()}\n  want ${Json.quote(decoded)}\n  got  ${Json.quote(back)}")
        }
    }
    val seconds = (System.nanoTime() - encodeStart) / 1e9
    out.println(String.format(java.util.Locale.ROOT,
        "tokenizer parity: %d texts, %d tokens: encode identical %d, decode identical %d (load %.2f s, check %.1f s)",
        lines, tokens, lines - encodeDiff, lines - decodeDiff, loaded, seconds))
    return if (encodeDiff == 0 && decodeDiff == 0 && lines > 0) 0 else 1
}
